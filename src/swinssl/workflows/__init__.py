"""Workflows: whole jobs made of stages, above the engine and below the CLI.

``demo`` (the job end to end on phantoms), ``study`` (the papers' claims), ``benchmark`` (pre-trained
Swin vs scratch vs nnU-Net), ``verdict`` (did pre-training pay off, paired), ``comparison`` (many arms:
Holm-corrected pairs, ranks, significance maps), ``estimate`` (a few measured steps before a run); ``fresh`` runs a
function in a fresh Python process for the ones that need one (the demo's parallel arms, the
estimate's probes). They call the engine, inference, metrics and the report; nothing below
imports them.
"""
