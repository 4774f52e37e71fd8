"""Test/demo/benchmark support: boot a real ComfyUI in-process or as a server, and generate tiny
seeded models and datasets. Used by tests/, bench/ and scripts/demo.py."""
