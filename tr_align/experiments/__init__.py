"""Experiments built on the library (the core never imports them): toy study, frontier, eval."""
