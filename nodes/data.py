"""Nodes: data (see docs/)."""

NODES = []
