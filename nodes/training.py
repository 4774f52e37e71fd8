"""Nodes: training (see docs/)."""

NODES = []
