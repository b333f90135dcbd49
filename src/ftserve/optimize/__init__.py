"""The optimize stage: merge adapters, quantize, gate on quality, export engines (``ftserve optimize``)."""
