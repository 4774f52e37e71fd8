"""Nodes: text_encoders (see docs/)."""

NODES = []
