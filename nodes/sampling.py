"""Nodes: sampling (see docs/)."""

NODES = []
