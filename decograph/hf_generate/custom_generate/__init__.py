"""The directory form of decograph's transformers ``custom_generate`` (see ``decograph.hf_generate``)."""
