"""Fine-tuning the world model on serialized cases (contract 2) with the HF Trainer."""
