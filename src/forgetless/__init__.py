"""forgetless: continual learning of language models."""
