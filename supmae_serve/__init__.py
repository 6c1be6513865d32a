"""supmae: Supervised Masked Autoencoders, from training to serving.

`supmae_serve.model` holds the model and the checkpoint contract; `supmae_serve.preprocess`
is the one place images become model input; the rest of this package serves a checkpoint.
"""

__version__ = "0.1.0"
