"""lorapool on other infrastructure: :mod:`lorapool.integrations.ray_serve` (extra ``ray``)."""
