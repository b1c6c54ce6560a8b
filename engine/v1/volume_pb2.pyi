import datetime

from engine.v1 import sandbox_pb2 as _sandbox_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VolumePathType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOLUME_PATH_TYPE_UNSPECIFIED: _ClassVar[VolumePathType]
    VOLUME_PATH_TYPE_FILE: _ClassVar[VolumePathType]
    VOLUME_PATH_TYPE_DIRECTORY: _ClassVar[VolumePathType]
    VOLUME_PATH_TYPE_SYMLINK: _ClassVar[VolumePathType]
    VOLUME_PATH_TYPE_OTHER: _ClassVar[VolumePathType]
VOLUME_PATH_TYPE_UNSPECIFIED: VolumePathType
VOLUME_PATH_TYPE_FILE: VolumePathType
VOLUME_PATH_TYPE_DIRECTORY: VolumePathType
VOLUME_PATH_TYPE_SYMLINK: VolumePathType
VOLUME_PATH_TYPE_OTHER: VolumePathType

class Volume(_message.Message):
    __slots__ = ("name", "created_at", "size_bytes", "file_count", "sandbox_ids", "url")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_IDS_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    name: str
    created_at: _timestamp_pb2.Timestamp
    size_bytes: int
    file_count: int
    sandbox_ids: _containers.RepeatedScalarFieldContainer[str]
    url: str
    def __init__(self, name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., file_count: _Optional[int] = ..., sandbox_ids: _Optional[_Iterable[str]] = ..., url: _Optional[str] = ...) -> None: ...

class VolumePath(_message.Message):
    __slots__ = ("path", "type", "size", "mode", "modified_at", "symlink_target")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    path: str
    type: VolumePathType
    size: int
    mode: int
    modified_at: _timestamp_pb2.Timestamp
    symlink_target: str
    def __init__(self, path: _Optional[str] = ..., type: _Optional[_Union[VolumePathType, str]] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., modified_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., symlink_target: _Optional[str] = ...) -> None: ...

class VolumeCreateRequest(_message.Message):
    __slots__ = ("name", "url", "s3")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    S3_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    s3: _sandbox_pb2.CloudBucketConfig
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., s3: _Optional[_Union[_sandbox_pb2.CloudBucketConfig, _Mapping]] = ...) -> None: ...

class VolumeCreateResponse(_message.Message):
    __slots__ = ("volume", "created")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    created: bool
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class VolumeListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VolumeListResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...

class VolumeDeleteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class VolumeDeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VolumeListPathRequest(_message.Message):
    __slots__ = ("volume", "pattern", "limit")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    volume: str
    pattern: str
    limit: int
    def __init__(self, volume: _Optional[str] = ..., pattern: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class VolumeListPathResponse(_message.Message):
    __slots__ = ("paths", "truncated")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedCompositeFieldContainer[VolumePath]
    truncated: bool
    def __init__(self, paths: _Optional[_Iterable[_Union[VolumePath, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class VolumeStatPathRequest(_message.Message):
    __slots__ = ("volume", "path")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    volume: str
    path: str
    def __init__(self, volume: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class VolumeStatPathResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: VolumePath
    def __init__(self, path: _Optional[_Union[VolumePath, _Mapping]] = ...) -> None: ...

class VolumeUploadHeader(_message.Message):
    __slots__ = ("volume", "path", "mode")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    volume: str
    path: str
    mode: int
    def __init__(self, volume: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ...) -> None: ...

class VolumeUploadRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: VolumeUploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[VolumeUploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class VolumeUploadResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: VolumePath
    def __init__(self, path: _Optional[_Union[VolumePath, _Mapping]] = ...) -> None: ...

class VolumeDownloadRequest(_message.Message):
    __slots__ = ("volume", "path")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    volume: str
    path: str
    def __init__(self, volume: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class VolumeDownloadResponse(_message.Message):
    __slots__ = ("path", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: VolumePath
    data: bytes
    def __init__(self, path: _Optional[_Union[VolumePath, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class VolumeMovePathRequest(_message.Message):
    __slots__ = ("volume", "source", "destination")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    volume: str
    source: str
    destination: str
    def __init__(self, volume: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ...) -> None: ...

class VolumeMovePathResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: VolumePath
    def __init__(self, path: _Optional[_Union[VolumePath, _Mapping]] = ...) -> None: ...

class VolumeCopyPathRequest(_message.Message):
    __slots__ = ("volume", "source", "destination")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    volume: str
    source: str
    destination: str
    def __init__(self, volume: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ...) -> None: ...

class VolumeCopyPathResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: VolumePath
    def __init__(self, path: _Optional[_Union[VolumePath, _Mapping]] = ...) -> None: ...

class VolumeDeletePathRequest(_message.Message):
    __slots__ = ("volume", "pattern")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    volume: str
    pattern: str
    def __init__(self, volume: _Optional[str] = ..., pattern: _Optional[str] = ...) -> None: ...

class VolumeDeletePathResponse(_message.Message):
    __slots__ = ("paths",)
    PATHS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, paths: _Optional[_Iterable[str]] = ...) -> None: ...
