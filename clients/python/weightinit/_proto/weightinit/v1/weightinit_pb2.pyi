from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_TORCH: _ClassVar[Layout]
    LAYOUT_KERAS: _ClassVar[Layout]

class FanMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAN_MODE_UNSPECIFIED: _ClassVar[FanMode]
    FAN_MODE_FAN_IN: _ClassVar[FanMode]
    FAN_MODE_FAN_OUT: _ClassVar[FanMode]
    FAN_MODE_FAN_AVG: _ClassVar[FanMode]
    FAN_MODE_FAN_GEO_AVG: _ClassVar[FanMode]

class Nonlinearity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONLINEARITY_UNSPECIFIED: _ClassVar[Nonlinearity]
    NONLINEARITY_LINEAR: _ClassVar[Nonlinearity]
    NONLINEARITY_SIGMOID: _ClassVar[Nonlinearity]
    NONLINEARITY_TANH: _ClassVar[Nonlinearity]
    NONLINEARITY_RELU: _ClassVar[Nonlinearity]
    NONLINEARITY_LEAKY_RELU: _ClassVar[Nonlinearity]
    NONLINEARITY_SELU: _ClassVar[Nonlinearity]

class Distribution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTION_UNSPECIFIED: _ClassVar[Distribution]
    DISTRIBUTION_TRUNCATED_NORMAL: _ClassVar[Distribution]
    DISTRIBUTION_UNTRUNCATED_NORMAL: _ClassVar[Distribution]
    DISTRIBUTION_UNIFORM: _ClassVar[Distribution]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
LAYOUT_UNSPECIFIED: Layout
LAYOUT_TORCH: Layout
LAYOUT_KERAS: Layout
FAN_MODE_UNSPECIFIED: FanMode
FAN_MODE_FAN_IN: FanMode
FAN_MODE_FAN_OUT: FanMode
FAN_MODE_FAN_AVG: FanMode
FAN_MODE_FAN_GEO_AVG: FanMode
NONLINEARITY_UNSPECIFIED: Nonlinearity
NONLINEARITY_LINEAR: Nonlinearity
NONLINEARITY_SIGMOID: Nonlinearity
NONLINEARITY_TANH: Nonlinearity
NONLINEARITY_RELU: Nonlinearity
NONLINEARITY_LEAKY_RELU: Nonlinearity
NONLINEARITY_SELU: Nonlinearity
DISTRIBUTION_UNSPECIFIED: Distribution
DISTRIBUTION_TRUNCATED_NORMAL: Distribution
DISTRIBUTION_UNTRUNCATED_NORMAL: Distribution
DISTRIBUTION_UNIFORM: Distribution

class GenerateRequest(_message.Message):
    __slots__ = ("seed", "tensors", "dtype", "chunk_bytes", "layout", "algorithm")
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    seed: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    dtype: DType
    chunk_bytes: int
    layout: Layout
    algorithm: int
    def __init__(self, seed: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., dtype: _Optional[_Union[DType, str]] = ..., chunk_bytes: _Optional[int] = ..., layout: _Optional[_Union[Layout, str]] = ..., algorithm: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "init", "dtype", "layout", "fan_in", "fan_out", "slice", "permute")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    PERMUTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    init: Init
    dtype: DType
    layout: Layout
    fan_in: int
    fan_out: int
    slice: Slice
    permute: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., init: _Optional[_Union[Init, _Mapping]] = ..., dtype: _Optional[_Union[DType, str]] = ..., layout: _Optional[_Union[Layout, str]] = ..., fan_in: _Optional[int] = ..., fan_out: _Optional[int] = ..., slice: _Optional[_Union[Slice, _Mapping]] = ..., permute: _Optional[_Iterable[int]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("dims", "flat", "shard")
    DIMS_FIELD_NUMBER: _ClassVar[int]
    FLAT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    dims: DimRanges
    flat: Range
    shard: Shard
    def __init__(self, dims: _Optional[_Union[DimRanges, _Mapping]] = ..., flat: _Optional[_Union[Range, _Mapping]] = ..., shard: _Optional[_Union[Shard, _Mapping]] = ...) -> None: ...

class DimRanges(_message.Message):
    __slots__ = ("ranges",)
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[Range]
    def __init__(self, ranges: _Optional[_Iterable[_Union[Range, _Mapping]]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("dim", "index", "count")
    DIM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    dim: int
    index: int
    count: int
    def __init__(self, dim: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class Init(_message.Message):
    __slots__ = ("zeros", "ones", "constant", "uniform", "normal", "truncated_normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "variance_scaling", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal", "torch_default", "torch_default_bias", "orthogonal", "eye", "identity", "dirac", "sparse")
    ZEROS_FIELD_NUMBER: _ClassVar[int]
    ONES_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    UNIFORM_FIELD_NUMBER: _ClassVar[int]
    NORMAL_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_NORMAL_FIELD_NUMBER: _ClassVar[int]
    XAVIER_UNIFORM_FIELD_NUMBER: _ClassVar[int]
    XAVIER_NORMAL_FIELD_NUMBER: _ClassVar[int]
    KAIMING_UNIFORM_FIELD_NUMBER: _ClassVar[int]
    KAIMING_NORMAL_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_SCALING_FIELD_NUMBER: _ClassVar[int]
    GLOROT_UNIFORM_FIELD_NUMBER: _ClassVar[int]
    GLOROT_NORMAL_FIELD_NUMBER: _ClassVar[int]
    HE_UNIFORM_FIELD_NUMBER: _ClassVar[int]
    HE_NORMAL_FIELD_NUMBER: _ClassVar[int]
    LECUN_UNIFORM_FIELD_NUMBER: _ClassVar[int]
    LECUN_NORMAL_FIELD_NUMBER: _ClassVar[int]
    TORCH_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    TORCH_DEFAULT_BIAS_FIELD_NUMBER: _ClassVar[int]
    ORTHOGONAL_FIELD_NUMBER: _ClassVar[int]
    EYE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DIRAC_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    zeros: Zeros
    ones: Ones
    constant: Constant
    uniform: Uniform
    normal: Normal
    truncated_normal: TruncatedNormal
    xavier_uniform: XavierUniform
    xavier_normal: XavierNormal
    kaiming_uniform: KaimingUniform
    kaiming_normal: KaimingNormal
    variance_scaling: VarianceScaling
    glorot_uniform: GlorotUniform
    glorot_normal: GlorotNormal
    he_uniform: HeUniform
    he_normal: HeNormal
    lecun_uniform: LecunUniform
    lecun_normal: LecunNormal
    torch_default: TorchDefault
    torch_default_bias: TorchDefaultBias
    orthogonal: Orthogonal
    eye: Eye
    identity: Identity
    dirac: Dirac
    sparse: Sparse
    def __init__(self, zeros: _Optional[_Union[Zeros, _Mapping]] = ..., ones: _Optional[_Union[Ones, _Mapping]] = ..., constant: _Optional[_Union[Constant, _Mapping]] = ..., uniform: _Optional[_Union[Uniform, _Mapping]] = ..., normal: _Optional[_Union[Normal, _Mapping]] = ..., truncated_normal: _Optional[_Union[TruncatedNormal, _Mapping]] = ..., xavier_uniform: _Optional[_Union[XavierUniform, _Mapping]] = ..., xavier_normal: _Optional[_Union[XavierNormal, _Mapping]] = ..., kaiming_uniform: _Optional[_Union[KaimingUniform, _Mapping]] = ..., kaiming_normal: _Optional[_Union[KaimingNormal, _Mapping]] = ..., variance_scaling: _Optional[_Union[VarianceScaling, _Mapping]] = ..., glorot_uniform: _Optional[_Union[GlorotUniform, _Mapping]] = ..., glorot_normal: _Optional[_Union[GlorotNormal, _Mapping]] = ..., he_uniform: _Optional[_Union[HeUniform, _Mapping]] = ..., he_normal: _Optional[_Union[HeNormal, _Mapping]] = ..., lecun_uniform: _Optional[_Union[LecunUniform, _Mapping]] = ..., lecun_normal: _Optional[_Union[LecunNormal, _Mapping]] = ..., torch_default: _Optional[_Union[TorchDefault, _Mapping]] = ..., torch_default_bias: _Optional[_Union[TorchDefaultBias, _Mapping]] = ..., orthogonal: _Optional[_Union[Orthogonal, _Mapping]] = ..., eye: _Optional[_Union[Eye, _Mapping]] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., dirac: _Optional[_Union[Dirac, _Mapping]] = ..., sparse: _Optional[_Union[Sparse, _Mapping]] = ...) -> None: ...

class Zeros(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Ones(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Constant(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: float
    def __init__(self, value: _Optional[float] = ...) -> None: ...

class Uniform(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class Normal(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ...) -> None: ...

class TruncatedNormal(_message.Message):
    __slots__ = ("mean", "std", "a", "b")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    a: float
    b: float
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., a: _Optional[float] = ..., b: _Optional[float] = ...) -> None: ...

class XavierUniform(_message.Message):
    __slots__ = ("gain",)
    GAIN_FIELD_NUMBER: _ClassVar[int]
    gain: float
    def __init__(self, gain: _Optional[float] = ...) -> None: ...

class XavierNormal(_message.Message):
    __slots__ = ("gain",)
    GAIN_FIELD_NUMBER: _ClassVar[int]
    gain: float
    def __init__(self, gain: _Optional[float] = ...) -> None: ...

class KaimingUniform(_message.Message):
    __slots__ = ("a", "mode", "nonlinearity")
    A_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NONLINEARITY_FIELD_NUMBER: _ClassVar[int]
    a: float
    mode: FanMode
    nonlinearity: Nonlinearity
    def __init__(self, a: _Optional[float] = ..., mode: _Optional[_Union[FanMode, str]] = ..., nonlinearity: _Optional[_Union[Nonlinearity, str]] = ...) -> None: ...

class KaimingNormal(_message.Message):
    __slots__ = ("a", "mode", "nonlinearity")
    A_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NONLINEARITY_FIELD_NUMBER: _ClassVar[int]
    a: float
    mode: FanMode
    nonlinearity: Nonlinearity
    def __init__(self, a: _Optional[float] = ..., mode: _Optional[_Union[FanMode, str]] = ..., nonlinearity: _Optional[_Union[Nonlinearity, str]] = ...) -> None: ...

class VarianceScaling(_message.Message):
    __slots__ = ("scale", "mode", "distribution")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    scale: float
    mode: FanMode
    distribution: Distribution
    def __init__(self, scale: _Optional[float] = ..., mode: _Optional[_Union[FanMode, str]] = ..., distribution: _Optional[_Union[Distribution, str]] = ...) -> None: ...

class GlorotUniform(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GlorotNormal(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeUniform(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeNormal(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LecunUniform(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LecunNormal(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TorchDefault(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TorchDefaultBias(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Orthogonal(_message.Message):
    __slots__ = ("gain",)
    GAIN_FIELD_NUMBER: _ClassVar[int]
    gain: float
    def __init__(self, gain: _Optional[float] = ...) -> None: ...

class Eye(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Identity(_message.Message):
    __slots__ = ("gain",)
    GAIN_FIELD_NUMBER: _ClassVar[int]
    gain: float
    def __init__(self, gain: _Optional[float] = ...) -> None: ...

class Dirac(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: int
    def __init__(self, groups: _Optional[int] = ...) -> None: ...

class Sparse(_message.Message):
    __slots__ = ("sparsity", "std")
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    sparsity: float
    std: float
    def __init__(self, sparsity: _Optional[float] = ..., std: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    chunk: Chunk
    end: TensorEnd
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[TensorEnd, _Mapping]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("index", "name", "shape", "output_shape", "dtype", "byte_length", "algorithm", "resolved")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    byte_length: int
    algorithm: int
    resolved: Resolved
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., output_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., byte_length: _Optional[int] = ..., algorithm: _Optional[int] = ..., resolved: _Optional[_Union[Resolved, _Mapping]] = ...) -> None: ...

class Resolved(_message.Message):
    __slots__ = ("scheme", "fan_in", "fan_out", "distribution", "low", "high", "mean", "std", "trunc_low", "trunc_high", "value", "gain", "rows", "cols", "groups", "zeros_per_column")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    TRUNC_LOW_FIELD_NUMBER: _ClassVar[int]
    TRUNC_HIGH_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ZEROS_PER_COLUMN_FIELD_NUMBER: _ClassVar[int]
    scheme: str
    fan_in: int
    fan_out: int
    distribution: str
    low: float
    high: float
    mean: float
    std: float
    trunc_low: float
    trunc_high: float
    value: float
    gain: float
    rows: int
    cols: int
    groups: int
    zeros_per_column: int
    def __init__(self, scheme: _Optional[str] = ..., fan_in: _Optional[int] = ..., fan_out: _Optional[int] = ..., distribution: _Optional[str] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., trunc_low: _Optional[float] = ..., trunc_high: _Optional[float] = ..., value: _Optional[float] = ..., gain: _Optional[float] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., groups: _Optional[int] = ..., zeros_per_column: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorEnd(_message.Message):
    __slots__ = ("tensor_index", "blake3", "byte_length", "name")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLAKE3_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    blake3: bytes
    byte_length: int
    name: str
    def __init__(self, tensor_index: _Optional[int] = ..., blake3: _Optional[bytes] = ..., byte_length: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ...) -> None: ...

class DigestResponse(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedCompositeFieldContainer[TensorEnd]
    def __init__(self, digests: _Optional[_Iterable[_Union[TensorEnd, _Mapping]]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "algorithms", "schemes", "dtypes", "limits")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    SCHEMES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    version: str
    algorithms: _containers.RepeatedScalarFieldContainer[int]
    schemes: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    limits: ServerLimits
    def __init__(self, version: _Optional[str] = ..., algorithms: _Optional[_Iterable[int]] = ..., schemes: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("default_chunk_bytes", "max_chunk_bytes", "max_request_bytes", "max_tensors", "max_concurrent_streams", "max_rank", "max_name_bytes", "max_matrix_elements", "max_request_work", "structured_jobs", "structured_memory_bytes")
    DEFAULT_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_NAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MATRIX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_WORK_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_JOBS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    default_chunk_bytes: int
    max_chunk_bytes: int
    max_request_bytes: int
    max_tensors: int
    max_concurrent_streams: int
    max_rank: int
    max_name_bytes: int
    max_matrix_elements: int
    max_request_work: int
    structured_jobs: int
    structured_memory_bytes: int
    def __init__(self, default_chunk_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_tensors: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., max_rank: _Optional[int] = ..., max_name_bytes: _Optional[int] = ..., max_matrix_elements: _Optional[int] = ..., max_request_work: _Optional[int] = ..., structured_jobs: _Optional[int] = ..., structured_memory_bytes: _Optional[int] = ...) -> None: ...
