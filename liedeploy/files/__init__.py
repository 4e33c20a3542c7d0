"""Offline file tools: merge_files, prune, PEFT conversion, inspect's description, model loading."""

__all__: list[str] = []
