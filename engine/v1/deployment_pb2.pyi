import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeploymentKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_KIND_UNSPECIFIED: _ClassVar[DeploymentKind]
    DEPLOYMENT_KIND_ENDPOINT: _ClassVar[DeploymentKind]
    DEPLOYMENT_KIND_TASK_QUEUE: _ClassVar[DeploymentKind]
DEPLOYMENT_KIND_UNSPECIFIED: DeploymentKind
DEPLOYMENT_KIND_ENDPOINT: DeploymentKind
DEPLOYMENT_KIND_TASK_QUEUE: DeploymentKind

class DeploymentSpec(_message.Message):
    __slots__ = ("name", "kind", "handler", "image", "cpu", "memory_mib", "timeout_seconds", "retries", "keep_warm_seconds", "workers", "callback_url", "max_pending", "traceback", "workspace", "outputs_expire_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    KEEP_WARM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_EXPIRE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: DeploymentKind
    handler: str
    image: str
    cpu: float
    memory_mib: int
    timeout_seconds: float
    retries: int
    keep_warm_seconds: float
    workers: int
    callback_url: str
    max_pending: int
    traceback: bool
    workspace: str
    outputs_expire_seconds: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[DeploymentKind, str]] = ..., handler: _Optional[str] = ..., image: _Optional[str] = ..., cpu: _Optional[float] = ..., memory_mib: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., retries: _Optional[int] = ..., keep_warm_seconds: _Optional[float] = ..., workers: _Optional[int] = ..., callback_url: _Optional[str] = ..., max_pending: _Optional[int] = ..., traceback: _Optional[bool] = ..., workspace: _Optional[str] = ..., outputs_expire_seconds: _Optional[float] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("id", "version", "spec", "created_at", "package_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    spec: DeploymentSpec
    created_at: _timestamp_pb2.Timestamp
    package_bytes: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., package_bytes: _Optional[int] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("spec", "package")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    package: bytes
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., package: _Optional[bytes] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class DeploymentListRequest(_message.Message):
    __slots__ = ("workspace", "name")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    name: str
    def __init__(self, workspace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeploymentListResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class DeploymentGetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeploymentGetResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class DeploymentDeleteRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeploymentDeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
