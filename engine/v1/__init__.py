"""Generated gRPC modules of the engine.v1 API.

``sandbox_pb2`` contains the messages and ``sandbox_pb2_grpc`` the stub and servicer
of SandboxService. Both are generated from proto/engine/v1/sandbox.proto by
proto/generate.sh and must not be edited by hand.
"""
