"""Networks: the Swin encoder, SwinUNETR, and loading of pre-trained weights."""

from swinssl.nn.build import build_encoder, build_network
from swinssl.nn.load import LoadReport, load_pretrained
from swinssl.nn.swin_transformer import SwinTransformer
from swinssl.nn.swin_unetr import SIZES, SwinUNETR, swin_unetr

__all__ = ["LoadReport", "SIZES", "SwinTransformer", "SwinUNETR", "build_encoder", "build_network", "load_pretrained", "swin_unetr"]
