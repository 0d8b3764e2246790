"""The option lists of the servers the presets start, as their own parsers define them.

Taken from the servers' sources (the `fetch`ed repositories; the commit of each is recorded in
its `ParserSyntax.source`), so that `flags.read_options` can tell which option an abbreviated
item really is. A list that lacks some option only makes the check stricter (a prefix looks
unique when the server would find it ambiguous and reject it anyway); a list with an option the
server does not have could hide an abbreviation, so nothing is added by hand.

Regenerate after a server upgrade that adds options: every `add_argument` string of the files
named in `source` (argparse's BooleanOptionalAction also accepts `--no-X`, recorded as an alias).
"""

from __future__ import annotations

from supervisor.backends.flags import ParserSyntax

_COMFYUI_LONG = frozenset({
    "--async-offload", "--auto-launch", "--base-directory", "--bf16-text-enc", "--bf16-unet",
    "--bf16-vae", "--cache-classic", "--cache-lru", "--cache-none", "--comfy-api-base", "--cpu",
    "--cpu-vae", "--cuda-device", "--cuda-malloc", "--database-url", "--default-device",
    "--default-hashing-function", "--deterministic", "--directml", "--disable-all-custom-nodes",
    "--disable-api-nodes", "--disable-auto-launch", "--disable-cuda-malloc",
    "--disable-ipex-optimize", "--disable-metadata", "--disable-mmap", "--disable-smart-memory",
    "--disable-xformers", "--dont-print-server", "--dont-upcast-attention",
    "--enable-compress-response-body", "--enable-cors-header", "--extra-model-paths-config",
    "--fast", "--force-channels-last", "--force-fp16", "--force-fp32", "--force-non-blocking",
    "--force-upcast-attention", "--fp16-text-enc", "--fp16-unet", "--fp16-vae", "--fp32-text-enc",
    "--fp32-unet", "--fp32-vae", "--fp64-unet", "--fp8_e4m3fn-text-enc", "--fp8_e4m3fn-unet",
    "--fp8_e5m2-text-enc", "--fp8_e5m2-unet", "--fp8_e8m0fnu-unet", "--front-end-root",
    "--front-end-version", "--gpu-only", "--highvram", "--input-directory", "--listen",
    "--log-stdout", "--lowvram", "--max-upload-size", "--mmap-torch-files", "--multi-user",
    "--normalvram", "--novram", "--oneapi-device-selector", "--output-directory", "--port",
    "--preview-method", "--preview-size", "--quick-test-for-ci", "--reserve-vram",
    "--supports-fp8-compute", "--temp-directory", "--tls-certfile", "--tls-keyfile",
    "--use-flash-attention", "--use-pytorch-cross-attention", "--use-quad-cross-attention",
    "--use-sage-attention", "--use-split-cross-attention", "--user-directory", "--verbose",
    "--whitelist-custom-nodes", "--windows-standalone-build",
})

_TEXTGEN_LONG = frozenset({
    "--adaptive-decay", "--adaptive-target", "--admin-key", "--api", "--api-disable-ipv4",
    "--api-enable-ipv6", "--api-key", "--api-port", "--attn-implementation", "--auto-launch",
    "--batch-size", "--bf16", "--cache-type", "--cfg-cache", "--chat-template-file",
    "--compute_dtype", "--cpu", "--cpu-memory", "--cpu-moe", "--ctx-size", "--ctx-size-draft",
    "--device-draft", "--disk", "--disk-cache-dir", "--do-sample", "--draft-max",
    "--dry-allowed-length", "--dry-base", "--dry-multiplier", "--dry-sequence-breakers",
    "--dynamic-temperature", "--dynatemp-exponent", "--dynatemp-high", "--dynatemp-low",
    "--enable-thinking", "--enable-tp", "--encoder-repetition-penalty", "--epsilon-cutoff",
    "--eta-cutoff", "--extensions", "--extra-flags", "--fit-target", "--force-safetensors",
    "--frequency-penalty", "--gpu-layers", "--gpu-layers-draft", "--gpu-split", "--gradio-auth",
    "--gradio-auth-path", "--guidance-scale", "--idle-timeout", "--ik", "--image-attn-backend",
    "--image-compile", "--image-cpu-offload", "--image-dtype", "--image-model", "--image-model-dir",
    "--image-quant", "--listen", "--listen-host", "--listen-port", "--load-in-4bit",
    "--load-in-8bit", "--loader", "--lora", "--lora-dir", "--min-p", "--mirostat-eta",
    "--mirostat-mode", "--mirostat-tau", "--mlock", "--mmproj", "--model", "--model-dir",
    "--model-draft", "--model-menu", "--multi-user", "--no-cache", "--no-kv-offload", "--no-mmap",
    "--no-repeat-ngram-size", "--no_use_fast", "--nowebui", "--numa", "--old-colors", "--parallel",
    "--penalty-alpha", "--portable", "--presence-penalty", "--preserve-thinking", "--public-api",
    "--public-api-id", "--quant_type", "--reasoning-effort", "--repetition-penalty",
    "--repetition-penalty-range", "--sampler-priority", "--settings", "--share",
    "--smoothing-curve", "--smoothing-factor", "--spec-ngram-min-hits", "--spec-ngram-size-m",
    "--spec-ngram-size-n", "--spec-type", "--split-mode", "--ssl-certfile", "--ssl-keyfile",
    "--streaming-llm", "--subpath", "--temperature", "--temperature-last", "--tensor-split",
    "--tfs", "--threads", "--threads-batch", "--top-a", "--top-k", "--top-n-sigma", "--top-p",
    "--tp-backend", "--trust-remote-code", "--typical-p", "--ubatch-size", "--use_double_quant",
    "--user-data-dir", "--verbose", "--xtc-probability", "--xtc-threshold",
})

_TEXTGEN_ALIASES = {'--n_ctx': '--ctx-size', '--max_seq_len': '--ctx-size', '--cache_type': '--cache-type', '--n-gpu-layers': '--gpu-layers', '--enable_tp': '--enable-tp', '--no-do-sample': '--do-sample', '--no-dynamic-temperature': '--dynamic-temperature', '--no-temperature-last': '--temperature-last', '--no-enable-thinking': '--enable-thinking', '--no-preserve-thinking': '--preserve-thinking'}

_VLLM_LONG = frozenset({
    "--additional-config", "--aggregate-engine-logging", "--all2all-backend", "--allow-credentials",
    "--allowed-headers", "--allowed-local-media-path", "--allowed-media-domains",
    "--allowed-methods", "--allowed-origins", "--api-key", "--api-server-count",
    "--async-scheduling", "--block-size", "--calculate-kv-scales", "--chat-template",
    "--chat-template-content-format", "--code-revision", "--cohere-format",
    "--cohere-is-reasoning-model", "--collect-detailed-traces", "--compilation-config", "--config",
    "--config-format", "--convert", "--cpu-offload-gb", "--cuda-graph-sizes",
    "--cudagraph-capture-sizes", "--data-parallel-address", "--data-parallel-backend",
    "--data-parallel-hybrid-lb", "--data-parallel-rank", "--data-parallel-rpc-port",
    "--data-parallel-size", "--data-parallel-size-local", "--data-parallel-start-rank",
    "--data-parallel-supervisor-port", "--dbo-decode-token-threshold",
    "--dbo-prefill-token-threshold", "--decode-context-parallel-size",
    "--default-chat-template-kwargs", "--default-mm-loras", "--disable-access-log-for-endpoints",
    "--disable-cascade-attn", "--disable-chunked-mm-input", "--disable-custom-all-reduce",
    "--disable-fastapi-docs", "--disable-hybrid-kv-cache-manager", "--disable-log-stats",
    "--disable-mm-preprocessor-cache", "--disable-nccl-for-dp-synchronization",
    "--disable-sliding-window", "--disable-uvicorn-access-log", "--distributed-executor-backend",
    "--download-dir", "--dp-supervisor-probe-failure-threshold", "--dp-supervisor-probe-interval-s",
    "--dp-supervisor-probe-timeout-s", "--dtype", "--enable-auto-tool-choice",
    "--enable-chunked-prefill", "--enable-dbo", "--enable-eplb", "--enable-expert-parallel",
    "--enable-flash-late-interaction", "--enable-force-include-usage", "--enable-log-deltas",
    "--enable-log-outputs", "--enable-lora", "--enable-mm-embeds",
    "--enable-multimodal-encoder-data-parallel", "--enable-offline-docs",
    "--enable-per-request-metrics", "--enable-prefix-caching", "--enable-prompt-embeds",
    "--enable-prompt-tokens-details", "--enable-request-id-headers",
    "--enable-server-load-tracking", "--enable-sleep-mode", "--enable-ssl-refresh",
    "--enable-tokenizer-info-endpoint", "--enforce-eager", "--eplb-config",
    "--eplb-log-balancedness", "--eplb-step-interval", "--eplb-window-size",
    "--exclude-tools-when-tool-choice-none", "--expert-placement-strategy", "--fingerprint-mode",
    "--fingerprint-value", "--fully-sharded-loras", "--generation-config",
    "--gpu-memory-utilization", "--grpc", "--guided-decoding-backend",
    "--guided-decoding-disable-additional-properties", "--guided-decoding-disable-any-whitespace",
    "--guided-decoding-disable-fallback", "--h11-max-header-count",
    "--h11-max-incomplete-event-size", "--headless", "--hf-config-path", "--hf-overrides",
    "--hf-token", "--host", "--ignore-patterns", "--interleave-mm-strings", "--io-processor-plugin",
    "--kv-cache-dtype", "--kv-cache-memory-bytes", "--kv-events-config",
    "--kv-sharing-fast-prefill", "--kv-transfer-config", "--limit-mm-per-prompt", "--load-format",
    "--log-config-file", "--log-error-stack", "--logits-processor-pattern", "--logits-processors",
    "--logprobs-mode", "--long-prefill-token-threshold", "--lora-dtype", "--lora-extra-vocab-size",
    "--lora-modules", "--mamba-block-size", "--mamba-cache-dtype", "--mamba-ssm-cache-dtype",
    "--max-cpu-loras", "--max-cudagraph-capture-size", "--max-log-len", "--max-logprobs",
    "--max-long-partial-prefills", "--max-lora-rank", "--max-loras", "--max-model-len",
    "--max-num-batched-tokens", "--max-num-partial-prefills", "--max-num-seqs",
    "--max-parallel-loading-workers", "--media-io-kwargs", "--middleware",
    "--mm-encoder-attn-backend", "--mm-encoder-tp-mode", "--mm-processor-cache-gb",
    "--mm-processor-cache-type", "--mm-processor-kwargs", "--mm-shm-cache-max-object-size-mb",
    "--model", "--model-impl", "--model-loader-extra-config", "--num-gpu-blocks-override",
    "--num-lookahead-slots", "--num-redundant-experts", "--otlp-traces-endpoint",
    "--override-attention-dtype", "--override-generation-config", "--override-pooler-config",
    "--pipeline-parallel-size", "--pooler-config", "--port", "--prefix-caching-hash-algo",
    "--pt-load-map-location", "--quantization", "--ray-workers-use-nsight", "--reasoning-parser",
    "--response-role", "--return-tokens-as-token-ids", "--revision", "--root-path",
    "--rope-scaling", "--rope-theta", "--runner", "--safetensors-load-strategy", "--scheduler-cls",
    "--scheduling-policy", "--seed", "--served-model-name", "--show-hidden-metrics-for-version",
    "--skip-mm-profiling", "--skip-tokenizer-init", "--speculative-config", "--ssl-ca-certs",
    "--ssl-cert-reqs", "--ssl-certfile", "--ssl-ciphers", "--ssl-keyfile",
    "--structured-outputs-config", "--swap-space", "--task", "--tensor-parallel-size",
    "--tokenizer", "--tokenizer-mode", "--tokenizer-revision", "--tokens-only",
    "--tool-call-parser", "--tool-parser-plugin", "--tool-server", "--trust-remote-code",
    "--trust-request-chat-template", "--uds", "--use-tqdm-on-load", "--uvicorn-log-level",
    "--video-pruning-rate", "--worker-cls", "--worker-extension-cls",
})

COMFYUI = ParserSyntax(
    "argparse", _COMFYUI_LONG,
    source="Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832 comfy/cli_args.py",
)

TEXTGEN = ParserSyntax(
    "argparse", _TEXTGEN_LONG, _TEXTGEN_ALIASES,
    source="oobabooga/text-generation-webui 1dcde41d03d13fc768316f4d2256a8a6dd044268 modules/shared.py",
)

#: `vllm serve`'s parser: FlexibleArgumentParser reads `--a_b` as `--a-b` and `--a.b x` as a
#: JSON value of `--a` (vllm/utils/argparse_utils.py). Bool config fields also get `--no-X`
#: (BooleanOptionalAction); those are not listed, which only makes the check stricter.
VLLM = ParserSyntax(
    "argparse", _VLLM_LONG,
    {"-q": "--quantization", "-pp": "--pipeline-parallel-size", "-tp": "--tensor-parallel-size",
     "-dcp": "--decode-context-parallel-size", "-dp": "--data-parallel-size", "-dpn": "--data-parallel-rank",
     "-dpr": "--data-parallel-start-rank", "-dpl": "--data-parallel-size-local", "-dpa": "--data-parallel-address",
     "-dpp": "--data-parallel-rpc-port", "-dpb": "--data-parallel-backend", "-O": "--compilation-config",
     "-asc": "--api-server-count", "--no-enable-lora": "--enable-lora",
     "--no-eplb-log-balancedness": "--eplb-log-balancedness"},
    source=("vllm-project/vllm vllm/engine/arg_utils.py@99d7eb5d6a512cfcc5a2b104f24ebf2d6cda772b (v0.11 series), "
            "vllm/entrypoints/openai/cli_args.py@005223338608bc94fd165a4f976c102a57bd1fc4 (FrontendArgs fields "
            "and make_arg_parser), vllm/utils/argparse_utils.py@00da11e37d1ffac917c3427fff227500302eb452"),
    underscores_as_dashes=True,
    dotted_keys=True,
)
