"""tr_align: Trust Region preference alignment (TR-DPO / TR-IPO / TR-KTO) in JAX/Flax.

Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656.
The losses (``tr_align.losses``) and the reference update (``tr_align.trust_region``)
are pure functions usable on their own; ``tr_align.training.step`` holds the train step and
``tr_align.training.loop`` the training loop behind ``tr-align train``.
"""

__version__ = "0.1.0"
