from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExampleTensor(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitExamplesRequest(_message.Message):
    __slots__ = ("model_name", "inputs", "raw_input_contents", "labels")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RAW_INPUT_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    inputs: _containers.RepeatedCompositeFieldContainer[ExampleTensor]
    raw_input_contents: _containers.RepeatedScalarFieldContainer[bytes]
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[ExampleTensor, _Mapping]]] = ..., raw_input_contents: _Optional[_Iterable[bytes]] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitExamplesResponse(_message.Message):
    __slots__ = ("accepted", "stored", "dropped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    stored: int
    dropped: int
    def __init__(self, accepted: _Optional[int] = ..., stored: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...
