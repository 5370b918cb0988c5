"""Pre-training methods: each a small module naming its model, views and losses."""

from swinssl.methods import swin_unetr, swinfuse, swinmm

METHODS = {"swin_unetr": swin_unetr, "swinmm": swinmm, "swinfuse": swinfuse}


def get_method(name: str):
    return METHODS[name]
