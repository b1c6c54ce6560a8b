"""The gRPC daemon: SandboxService over a unix socket and optional TCP.

``create_server`` (in ``engine.server.app``) builds the server around an
``Engine``, and ``engine.server.daemon.serve`` runs it until SIGTERM or SIGINT.
This package imports nothing on its own, so that the SDK can import
``engine.server.convert`` without loading the server.
"""
