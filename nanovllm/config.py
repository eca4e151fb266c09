"""Engine configuration: one dataclass, validated once, read everywhere."""
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.attention.kv_quant import is_fp8, kv_cache_torch_dtype
from nanovllm.cascade.cost_model import SHARED_BACKEND_CHOICES
from nanovllm.layers.awq_format import check_model as check_awq_model
from nanovllm.layers.awq_format import check_parallel as check_awq_parallel
from nanovllm.layers.awq_format import read_quant_config
from nanovllm.utils.blas import blas_library
from nanovllm.models.llama import head_dim
from nanovllm.models.registry import check_model_config


# The head sizes FlashInfer's paged prefill/decode kernels are built for here (head_dim 16 stops inside
# FlashInfer with "Invalid configuration", seen on the H200).
FLASHINFER_HEAD_DIMS = (64, 128, 256)


@dataclass
class Config:
    model: str
    max_num_batched_tokens: int = 16384   # token budget of one prefill step (longer prompts are chunked)
    max_num_seqs: int = 512               # running sequences at most (also the largest CUDA graph)
    max_model_len: int = 4096             # prompt + output tokens, capped by the model's positions
    gpu_memory_utilization: float = 0.9   # share of GPU memory the engine may hold, KV cache included
    kvcache_block_size: int = 16          # tokens per KV page
    num_kvcache_blocks: int = -1          # explicit KV pages; -1 sizes it from memory
    cpu_kvcache_gb: float = 2.0           # KV cache size on CPU when num_kvcache_blocks is -1
    enforce_eager: bool = False           # no CUDA graphs
    tensor_parallel_size: int = 1         # ranks (GPUs) that split every layer; all nodes together
    nnodes: int = 1                       # hosts of the tensor-parallel group (tensor_parallel_size / nnodes GPUs each)
    node_rank: int = 0                    # this host's index; node 0 runs the engine (rank 0)
    master_addr: str = "127.0.0.1"        # rendezvous host (node 0), torch.distributed tcp://
    master_port: int = 0                  # rendezvous port; 0 picks a free one (single node only)
    distributed_timeout_s: float = 1800.0 # collectives and rendezvous give up after this long
    disable_custom_all_reduce: bool = False  # NCCL for every all-reduce (no FlashInfer IPC all-reduce)
    load_format: str = "auto"             # auto: safetensors from the model folder; dummy: random weights from config.json
    dtype: str = "auto"                   # auto: checkpoint dtype on GPU, float32 on CPU
    kv_cache_dtype: str = "auto"          # auto: the model dtype; fp8_e4m3 (alias fp8): 1-byte pages, per-layer scales
    device: str = "auto"                  # auto: cuda when available, else cpu
    attention_backend: str = "auto"       # auto: flashinfer on cuda, torch on cpu
    enable_prefix_caching: bool = True
    host_kvcache_gb: float = 0.0          # host-memory KV tier per rank (pinned on CUDA); 0 = off
    host_kv_prefetch: bool = True         # restore waiting requests' host pages before admission
    host_kv_write_ahead: bool = True      # copy free GPU pages to host before their eviction needs it
    schedule_policy: str = "fcfs"         # order of waiting requests: fcfs, lpm, dfs-weight, random
    max_wait_s: float = 10.0              # starvation bound: a request waiting longer is admitted first
    enable_cascade_attention: bool = False
    cascade_shared_prefix_len: int = 0    # >0 forces one shared level of this many tokens
    cascade_max_levels: int = 3           # shared levels + the per-request level
    cascade_shared_backend: str = "auto"  # kernel of shared levels in graphed decode: auto, triton, triton-wide, fa2, fa3, fa3-split
    decode_attention_kernel: str = "auto" # regular decode on FlashInfer: auto (xqa, else triton, for an fp8 cache),
                                          # flashinfer, triton (also cascade's per-request level), xqa
    seed: int = 0
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos_token_ids: tuple = ()               # set by the engine from the tokenizer and generation config

    def __post_init__(self):
        blas_library()   # a bad $NANOVLLM_BLAS_LIBRARY fails here, before any process starts
        if not os.path.isdir(self.model):
            raise ValueError(f"model folder not found: {self.model!r}")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"no config.json in model folder {self.model!r}")
        if self.kvcache_block_size < 1 or self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two, got {self.kvcache_block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        # Found by fuzzing configs: these were accepted and failed later with a confusing message (every
        # request "too long for max_model_len=0", "cannot convert float NaN to integer", numpy's "expected
        # non-negative integer") or silently did something else (num_kvcache_blocks=0 or -7 sized the cache
        # from memory, cpu_kvcache_gb=0 made a one-page cache).
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and an output token), got "
                             f"{self.max_model_len}")
        if self.num_kvcache_blocks != -1 and self.num_kvcache_blocks < 1:
            raise ValueError(f"num_kvcache_blocks must be -1 (size it from memory) or >= 1, got "
                             f"{self.num_kvcache_blocks}")
        if not 0 < self.cpu_kvcache_gb < math.inf:
            raise ValueError(f"cpu_kvcache_gb must be > 0 and finite, got {self.cpu_kvcache_gb}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.cascade_shared_prefix_len < 0:
            raise ValueError(f"cascade_shared_prefix_len must be >= 0 (0: not forced), got "
                             f"{self.cascade_shared_prefix_len}")
        if self.cascade_max_levels < 2:
            raise ValueError(f"cascade_max_levels must be >= 2, got {self.cascade_max_levels}")
        if self.cascade_shared_backend not in SHARED_BACKEND_CHOICES:
            raise ValueError(f"cascade_shared_backend must be {', '.join(SHARED_BACKEND_CHOICES[:-1])} or "
                             f"{SHARED_BACKEND_CHOICES[-1]}, got {self.cascade_shared_backend!r}")
        if self.decode_attention_kernel not in ("auto", "flashinfer", "triton", "xqa"):
            raise ValueError(f"decode_attention_kernel must be auto, flashinfer, triton or xqa, got "
                             f"{self.decode_attention_kernel!r}")
        if self.schedule_policy not in ("fcfs", "lpm", "dfs-weight", "random"):
            raise ValueError(f"schedule_policy must be fcfs, lpm, dfs-weight or random, got {self.schedule_policy!r}")
        if not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {self.max_wait_s}")
        if not 0 <= self.host_kvcache_gb < math.inf:
            raise ValueError(f"host_kvcache_gb must be >= 0 and finite, got {self.host_kvcache_gb}")
        if self.host_kvcache_gb > 0 and not self.enable_prefix_caching:
            raise ValueError("host_kvcache_gb needs enable_prefix_caching: host pages are found by their prefix hash")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        self.hf_config = AutoConfig.from_pretrained(self.model)
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        check_model_config(self.hf_config, self.max_model_len)  # architecture and its features, before any device work
        self.quantization = read_quant_config(self.hf_config)  # None (dense) or AWQConfig; unsupported ones refused
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.attention_backend == "auto":
            self.attention_backend = "flashinfer" if self.device == "cuda" else "torch"
        if self.attention_backend not in ("torch", "flashinfer"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r} (torch or flashinfer)")
        if self.dtype == "auto":
            self.torch_dtype = (getattr(self.hf_config, "torch_dtype", None) or getattr(self.hf_config, "dtype", None)
                                or torch.bfloat16) if self.device == "cuda" else torch.float32
            if isinstance(self.torch_dtype, str):
                self.torch_dtype = getattr(torch, self.torch_dtype)
        else:
            self.torch_dtype = getattr(torch, self.dtype, None)
            if not isinstance(self.torch_dtype, torch.dtype):
                raise ValueError(f"unknown dtype {self.dtype!r}")
        self.kv_dtype = kv_cache_torch_dtype(self.kv_cache_dtype, self.torch_dtype)  # the cache tensor's dtype
        if is_fp8(self.kv_dtype) and self.attention_backend == "flashinfer" and self.cascade_shared_backend in ("fa3", "fa3-split"):
            raise ValueError(f"cascade_shared_backend={self.cascade_shared_backend!r} reads no fp8 KV cache with bf16 "
                             "queries (FlashInfer's FA3 needs fp8 queries too): use auto, triton, triton-wide or fa2 "
                             "with kv_cache_dtype='fp8_e4m3'")
        if self.decode_attention_kernel == "xqa" and not is_fp8(self.kv_dtype):
            raise ValueError("decode_attention_kernel='xqa' serves an fp8 KV cache only (kv_cache_dtype='fp8_e4m3'): "
                             "on a bf16 cache its generic kernel is slower than FlashInfer's decode")
        if is_fp8(self.kv_dtype) and self.attention_backend == "flashinfer" and self.device.startswith("cuda") \
                and torch.cuda.is_available():
            # The fp8 stores and the Triton shared-level kernel use Triton's fp8e4nv, which it compiles
            # only for sm_89+ (Ada, Hopper and newer): an older GPU would fail at the first step, not here.
            major, minor = torch.cuda.get_device_capability(torch.device(self.device))
            if (major, minor) < (8, 9):
                raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs a GPU of compute capability 8.9 or "
                                 f"newer (Ada, Hopper and later) for its Triton fp8 kernels; this one is {major}.{minor}: "
                                 f"use kv_cache_dtype='auto'")
        if self.attention_backend == "flashinfer" and self.torch_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FlashInfer attention runs in bfloat16 or float16, not {self.torch_dtype}: on a GPU, "
                             f"pass dtype='bfloat16', or attention_backend='torch' for {self.torch_dtype} (unfused "
                             f"PyTorch layers, slow)")
        if self.device == "cpu" or not torch.cuda.is_available():
            self.enforce_eager = True  # CUDA graphs need CUDA
        self._check_parallel()
        heads = head_dim(self.hf_config)
        if self.attention_backend == "flashinfer" and heads not in FLASHINFER_HEAD_DIMS:
            raise ValueError(f"FlashInfer attention needs head_dim in {FLASHINFER_HEAD_DIMS}, this model has {heads}: "
                             f"use attention_backend='torch' (unfused PyTorch attention, slow)")
        if self.quantization is not None:
            check_awq_model(self.hf_config, self.quantization)
            check_awq_parallel(self.hf_config, self.quantization, self.tensor_parallel_size)

    def _check_parallel(self):
        """Tensor-parallel settings, checked before any process starts."""
        n, nodes, hf = self.tensor_parallel_size, self.nnodes, self.hf_config
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
        if not isinstance(nodes, int) or nodes < 1 or n % nodes:
            raise ValueError(f"nnodes={nodes!r} must be >= 1 and divide tensor_parallel_size={n}")
        if not 0 <= self.node_rank < nodes:
            raise ValueError(f"node_rank={self.node_rank} must be in [0, nnodes={nodes})")
        if nodes > 1 and not (0 < self.master_port < 65536 and self.master_addr):
            raise ValueError("several nodes need --master-addr and --master-port (node 0's address and a free port)")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port must be in [0, 65536), got {self.master_port}")
        if n == 1:
            return
        from nanovllm.distributed.custom_all_reduce import check_backend, default_backend
        check_backend(default_backend())
        heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
        if heads % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide the {heads} attention heads")
        if kv_heads % n and n % kv_heads:
            raise ValueError(f"tensor_parallel_size={n} neither divides nor is a multiple of the {kv_heads} KV heads")
        if hf.intermediate_size % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide intermediate_size={hf.intermediate_size}")
        moe_width = getattr(hf, "moe_intermediate_size", None)  # each expert's width (MoE models)
        if moe_width and moe_width % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide moe_intermediate_size={moe_width}")
        if self.device.startswith("cuda") and n // nodes > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={n} over {nodes} node(s) needs {n // nodes} GPUs per node, "
                             f"{torch.cuda.device_count()} visible")
