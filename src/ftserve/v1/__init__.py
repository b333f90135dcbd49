"""Generated gRPC code of ``proto/ftserve/v1/ftserve.proto`` (``make proto``); do not edit."""
