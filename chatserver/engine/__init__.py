"""The async front of inference: prompts, dispatch to workers, token streams."""
