"""forgetless: continual learning of language models (the package marker; main's LAYOUT commit brings the public API)."""
