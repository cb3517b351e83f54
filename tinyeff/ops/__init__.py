"""Small forward/backward pairs reused by the attention variants and the layers."""
