"""The serving layer: OpenAI protocol, routes, metrics and the BentoML service shell."""
