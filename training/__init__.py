"""supmae-train and supmae-eval: pretraining, fine-tuning, linear probing and evaluation."""
