import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE_TYPE_UNSPECIFIED: _ClassVar[FileType]
    FILE_TYPE_FILE: _ClassVar[FileType]
    FILE_TYPE_DIRECTORY: _ClassVar[FileType]
    FILE_TYPE_SYMLINK: _ClassVar[FileType]
    FILE_TYPE_OTHER: _ClassVar[FileType]
FILE_TYPE_UNSPECIFIED: FileType
FILE_TYPE_FILE: FileType
FILE_TYPE_DIRECTORY: FileType
FILE_TYPE_SYMLINK: FileType
FILE_TYPE_OTHER: FileType

class FileInfo(_message.Message):
    __slots__ = ("path", "path_raw", "name", "name_raw", "type", "size", "mode", "mtime", "uid", "gid", "target", "target_raw")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_RAW_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_RAW_FIELD_NUMBER: _ClassVar[int]
    path: str
    path_raw: bytes
    name: str
    name_raw: bytes
    type: FileType
    size: int
    mode: int
    mtime: _timestamp_pb2.Timestamp
    uid: int
    gid: int
    target: str
    target_raw: bytes
    def __init__(self, path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., name: _Optional[str] = ..., name_raw: _Optional[bytes] = ..., type: _Optional[_Union[FileType, str]] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., mtime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., target: _Optional[str] = ..., target_raw: _Optional[bytes] = ...) -> None: ...

class UploadFileHeader(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "mode", "parents", "overwrite", "host_file")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    HOST_FILE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    mode: int
    parents: bool
    overwrite: bool
    host_file: HostFile
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., mode: _Optional[int] = ..., parents: _Optional[bool] = ..., overwrite: _Optional[bool] = ..., host_file: _Optional[_Union[HostFile, _Mapping]] = ...) -> None: ...

class HostFile(_message.Message):
    __slots__ = ("path", "device", "inode")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    path: str
    device: int
    inode: int
    def __init__(self, path: _Optional[str] = ..., device: _Optional[int] = ..., inode: _Optional[int] = ...) -> None: ...

class UploadFileEnd(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class UploadFileRequest(_message.Message):
    __slots__ = ("header", "data", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: UploadFileHeader
    data: bytes
    end: UploadFileEnd
    def __init__(self, header: _Optional[_Union[UploadFileHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[_Union[UploadFileEnd, _Mapping]] = ...) -> None: ...

class UploadFileResponse(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class DownloadFileRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "host_file")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    HOST_FILE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    host_file: HostFile
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., host_file: _Optional[_Union[HostFile, _Mapping]] = ...) -> None: ...

class DownloadFileHeader(_message.Message):
    __slots__ = ("size", "mode")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    size: int
    mode: int
    def __init__(self, size: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class DownloadFileResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DownloadFileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[DownloadFileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatFileRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ...) -> None: ...

class StatFileResponse(_message.Message):
    __slots__ = ("file",)
    FILE_FIELD_NUMBER: _ClassVar[int]
    file: FileInfo
    def __init__(self, file: _Optional[_Union[FileInfo, _Mapping]] = ...) -> None: ...

class ListFilesRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "recursive")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    recursive: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., recursive: _Optional[bool] = ...) -> None: ...

class ListFilesResponse(_message.Message):
    __slots__ = ("files", "truncated")
    FILES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    truncated: bool
    def __init__(self, files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class CreateDirectoryRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "mode", "parents")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    mode: int
    parents: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., mode: _Optional[int] = ..., parents: _Optional[bool] = ...) -> None: ...

class CreateDirectoryResponse(_message.Message):
    __slots__ = ("file",)
    FILE_FIELD_NUMBER: _ClassVar[int]
    file: FileInfo
    def __init__(self, file: _Optional[_Union[FileInfo, _Mapping]] = ...) -> None: ...

class DeleteFileRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ...) -> None: ...

class DeleteFileResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteDirectoryRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "recursive")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    recursive: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., recursive: _Optional[bool] = ...) -> None: ...

class DeleteDirectoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("sandbox_id", "source", "source_raw", "destination", "destination_raw", "overwrite")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_RAW_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_RAW_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    source: str
    source_raw: bytes
    destination: str
    destination_raw: bytes
    overwrite: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., source: _Optional[str] = ..., source_raw: _Optional[bytes] = ..., destination: _Optional[str] = ..., destination_raw: _Optional[bytes] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class MoveResponse(_message.Message):
    __slots__ = ("file",)
    FILE_FIELD_NUMBER: _ClassVar[int]
    file: FileInfo
    def __init__(self, file: _Optional[_Union[FileInfo, _Mapping]] = ...) -> None: ...

class ChmodRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "mode")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    mode: int
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., mode: _Optional[int] = ...) -> None: ...

class ChmodResponse(_message.Message):
    __slots__ = ("file",)
    FILE_FIELD_NUMBER: _ClassVar[int]
    file: FileInfo
    def __init__(self, file: _Optional[_Union[FileInfo, _Mapping]] = ...) -> None: ...

class FindInFilesRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "pattern", "max_matches")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    MAX_MATCHES_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    pattern: str
    max_matches: int
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., pattern: _Optional[str] = ..., max_matches: _Optional[int] = ...) -> None: ...

class FileMatch(_message.Message):
    __slots__ = ("path", "path_raw", "line", "column", "text")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    path: str
    path_raw: bytes
    line: int
    column: int
    text: str
    def __init__(self, path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., line: _Optional[int] = ..., column: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class FindInFilesResponse(_message.Message):
    __slots__ = ("matches", "truncated")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[FileMatch]
    truncated: bool
    def __init__(self, matches: _Optional[_Iterable[_Union[FileMatch, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ReplaceInFilesRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "path_raw", "pattern", "replacement")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    path_raw: bytes
    pattern: str
    replacement: str
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., path_raw: _Optional[bytes] = ..., pattern: _Optional[str] = ..., replacement: _Optional[str] = ...) -> None: ...

class ChangedFile(_message.Message):
    __slots__ = ("path", "path_raw")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PATH_RAW_FIELD_NUMBER: _ClassVar[int]
    path: str
    path_raw: bytes
    def __init__(self, path: _Optional[str] = ..., path_raw: _Optional[bytes] = ...) -> None: ...

class ReplaceInFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ChangedFile]
    def __init__(self, files: _Optional[_Iterable[_Union[ChangedFile, _Mapping]]] = ...) -> None: ...
