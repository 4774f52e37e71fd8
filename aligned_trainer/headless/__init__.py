"""Headless runs: start ComfyUI's ``main.py`` with this pack as a child process, turn saved workflows into API
prompts, queue them and follow them over the websocket. Standard library and aiohttp only: nothing here
imports ComfyUI, its node API or the training engine (see docs/headless.md). Used by ``aligned_trainer.cli``,
scripts/demo.py and the tests."""
