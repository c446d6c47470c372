"""Model manifests, small artifacts (gate, domain prompts) and the model cache."""
