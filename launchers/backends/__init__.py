"""The launcher's training backends: ``toy`` (the embedded policy, plain PyTorch) and ``hf`` (Hugging Face TRL)."""
