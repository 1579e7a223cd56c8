"""Numpy decoders, one module per codec. They receive validated arrays and return float32."""
