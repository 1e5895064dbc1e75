"""A static WAND decode step: one shape for every step, so it can be compiled or captured once.

After the prefill, a WandCache never changes shape: per layer one K/V buffer of ``P_max + W``
slots, and a decode step writes one ring slot. :class:`StaticDecoder` keeps everything that changes
from step to step on the device (the ring slot, each sample's next position, the slots' positions
and validity) and updates it in place, computes the step's WAND mask on the device, and calls the
model's own forward (past the ``enable_wand`` wrapper, whose planning uses host integers). So one
step is the same sequence of kernels every time, with no host-device synchronisation:

* on CUDA it is captured once as a ``torch.cuda.CUDAGraph`` and replayed (``mode="graph"``). The
  graph is captured from the eager step directly, not through ``torch.compile(mode=
  "reduce-overhead")``: the eager step is already free of host synchronisation (tested), a capture
  takes one step instead of a compilation per shape (tens of seconds for a 24-layer model, per
  batch size), and the graph removes the launch overhead, which is what bounds an eager step
  (~34 ms of launches for a 0.5B model on an H100 against ~0.3 ms of weight reads). Compiled
  CUDA-graph trees would also need every in-place state tensor marked as a static address.
* ``mode="compile"`` runs the step through ``torch.compile`` (inductor; CPU and GPU), which is how CI
  checks the static step compiled; its graphs are shared by every decoder of the process, the sizes
  made dynamic from the second shape on (``_run_compiled``);
* ``mode="compile-graph"`` (CUDA) captures the ``torch.compile``d step as the CUDA graph: inductor's
  fused kernels (norms, RoPE, the mask's elementwise ops) replayed without launch overhead, as the
  full-attention baseline of ``benchmarks/serving.py`` is (compiled with CUDA graphs). It compiles in
  the warm-up step before the capture (tens of seconds for a 24-layer model), so it is opt-in;
* ``mode="eager"`` runs it as it is.

Given a :class:`wand.sampling.Sampling`, a step also picks its token (argmax or a draw, the finished
samples padded, stop ids noted) and the next step continues from it: the graph holds the whole step,
token to token, and the host only replays it (``step()``) and keeps the tokens it returns. An argmax
pick is compiled with the step; a draw runs after ``torch.compile``'s part (inductor would swap its
random stream for its own) but inside the CUDA graph, whose replays draw from the registered
generator as the eager step would.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache

from .cache import WandCache
from .masks import additive_mask, visibility
from .patch import is_enabled, original_forward
from .sampling import Sampling

__all__ = ["StaticDecoder", "STATIC_MODES", "GRAPH_MODES", "STATIC_RECOMPILE_LIMIT"]

STATIC_MODES = ("eager", "compile", "graph", "compile-graph")
GRAPH_MODES = ("graph", "compile-graph")  # captured as CUDA graphs (CUDA only)
STATIC_RECOMPILE_LIMIT = 64  # compiled step graphs a process may hold (mode="compile"); see _run_compiled


class _StaticLayer:
    """One layer's K/V buffer (the WandCache's, after the prefill), written at a device slot index."""

    is_sliding = False
    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values
        self.is_initialized = True


class _StaticCache(Cache):
    """The cache the model's own forward sees during a static step: ``update`` writes the step's one
    key/value column at ``slot`` (a device index) and returns the whole buffer."""

    is_compileable = True

    def __init__(self, layers: list[_StaticLayer], slot: torch.Tensor, seq_length: int):
        super().__init__(layers=[])
        self.layers = layers
        self.slot = slot
        self._seq_length = seq_length  # constant: nothing in the step may depend on a growing count

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.keys.index_copy_(2, self.slot, key_states)
        layer.values.index_copy_(2, self.slot, value_states)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seq_length, 0


class StaticDecoder:
    """Decode steps over a prefilled :class:`WandCache`, with fixed shapes and device-side state.

    Args:
        model: a model patched with ``wand.enable_wand`` (dense ``sdpa``/``eager`` attention).
        cache: the WandCache after the prefill (it is taken over: the decoder writes its buffers).
        mode: ``"eager"``, ``"compile"`` (torch.compile), ``"graph"`` (CUDA graph of the eager step) or
            ``"compile-graph"`` (CUDA graph of the compiled step); the graph modes need CUDA.
        model_kwargs: extra keyword arguments for every step (rarely needed).
        sampling: the step picks its own token with it (see below); ``None``: it returns logits.
        stop_ids: with ``sampling``, LongTensor of stop ids: a sample that picked one is finished, and
            every later pick of it is ``pad_token_id``.

    ``step(tokens)`` takes LongTensor[B] (the previous step's tokens, on the cache's device) and
    returns the logits of the next position, FloatTensor[B, V]. The returned tensor is the graph's
    output buffer in ``"graph"`` mode: read it before the next step. ``sync_cache()`` writes the
    steps' bookkeeping back into the WandCache before anything else decodes from it.

    With ``sampling``: ``pick(logits)`` picks the first tokens (from the prefill's logits), and each
    ``step()`` decodes them and returns the next ones, LongTensor[B] (the decoder's buffer: clone it
    to keep it), continuing from its own last pick; ``finished`` (BoolTensor[B]) marks the samples
    that met a stop id.
    """

    def __init__(self, model: torch.nn.Module, cache: WandCache, mode: str = "eager", model_kwargs: dict | None = None,
                 sampling: Sampling | None = None, stop_ids: torch.Tensor | None = None, pad_token_id: int = 0):
        if mode not in STATIC_MODES:
            raise ValueError(f"mode must be one of {', '.join(STATIC_MODES)}, got {mode!r}")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a wand.sampling.Sampling, got {type(sampling).__name__}")
        if not is_enabled(model):
            raise ValueError("StaticDecoder needs a model patched with wand.enable_wand(model, window)")
        impl = model.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"the static decode step needs dense attention (sdpa or eager), not {impl!r}: "
                             "decode with model.set_attn_implementation('sdpa')")
        if not isinstance(cache, WandCache) or not cache.layers or not cache._prefix_complete:
            raise ValueError("StaticDecoder needs a WandCache after a prefill that covered every prefix")
        keys = cache.layers[0].keys
        self.device = keys.device
        if mode in GRAPH_MODES and self.device.type != "cuda":
            raise ValueError(f"mode={mode!r} captures a CUDA graph; the cache is on {self.device}")
        self.model = model
        self.cache = cache
        self.steps = 0  # steps since the last sync_cache (a host count: no device read)
        self.window = cache.window
        self.num_prefix = cache.num_prefix
        self.batch = keys.shape[0]
        self.dtype = keys.dtype
        self.mode = mode
        forward = original_forward(model)
        params = inspect.signature(forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.extra = dict(model_kwargs or {})
        if "prefix_lengths" in params:
            self.extra["prefix_lengths"] = cache.prefix_lengths
        # Device state, updated in place by every step.
        self.prefix_lengths = cache.prefix_lengths
        self.key_positions = cache.key_positions
        self.key_valid = cache.key_valid
        self.next_position = cache._next_position.clone()
        first = self.num_prefix + cache._ring_columns_written % self.window
        self.slot = torch.tensor([first], dtype=torch.long, device=self.device)
        self._ring_start = torch.tensor(self.num_prefix, dtype=torch.long, device=self.device)
        self.static_cache = _StaticCache([_StaticLayer(layer.keys, layer.values) for layer in cache.layers],
                                         self.slot, self.num_prefix + self.window)
        self.tokens = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.valid = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.sampling = sampling
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        self._stop_ids = torch.as_tensor([] if stop_ids is None else stop_ids, dtype=torch.long).to(self.device)
        self._pad = torch.tensor(pad_token_id, dtype=torch.long, device=self.device)
        self._compiled = None
        self._graphs: dict[bool, tuple] = {}  # masked -> (CUDA graph, its output buffer)
        # Read once here, never in a step: does every prefix slot hold a valid key of a full prefix?
        self._prefix_full = bool((self.prefix_lengths == self.num_prefix).all()
                                 and self.key_valid[:, :self.num_prefix].all())
        self._clean_steps = 0  # consecutive steps whose every column was valid
        # The unmasked form's mask: zeros, built once. (A None mask would have transformers build its
        # own causal mask every step, more kernels than ours, not fewer.)
        self._open_mask = torch.zeros(self.batch, 1, 1, self.num_prefix + self.window, dtype=self.dtype,
                                      device=self.device)

    # ------------------------------------------------------------------ the step
    def _step(self, masked: bool = True) -> torch.Tensor:
        """One decode step on ``self.tokens``; every shape and index lives on the device. ``masked``
        False: every slot is visible (see ``_all_visible``), so no mask is built: a zero mask made once."""
        # As the eager step (WandCache._plan_decode): a sample whose column is not valid (masked out)
        # does not advance, and its slot is marked invalid for every later query.
        step = self.valid.long()
        positions = (self.next_position + step - 1).clamp(min=0).view(-1, 1)
        self.key_positions.index_copy_(1, self.slot, positions)
        self.key_valid.index_copy_(1, self.slot, self.valid.view(-1, 1))
        mask = self._open_mask  # all zeros, made once: no mask kernels in this step
        if masked:
            visible, _ = visibility(positions, self.key_positions, self.prefix_lengths, self.window, self.key_valid)
            mask = additive_mask(visible, None, self.dtype)
        out = original_forward(self.model)(
            input_ids=self.tokens.view(-1, 1), attention_mask=mask, position_ids=positions, use_cache=True,
            **{self.cache_kw: self.static_cache}, **self.extra)
        self.next_position.add_(step)
        # Next ring slot: num_prefix + (slot - num_prefix + 1) mod W, in place.
        self.slot.sub_(self._ring_start).add_(1).remainder_(self.window).add_(self._ring_start)
        return out.logits[:, -1]

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next tokens from ``logits`` [B, V] (device ops only): sampled, ``pad_token_id`` for a
        finished sample, a stop id finishing its sample. Written into the decoder's token buffer, which
        the next step decodes, and returned."""
        if self.sampling is None:
            raise ValueError("pick() needs a decoder made with sampling=wand.sampling.Sampling(...)")
        token = torch.where(self.finished, self._pad, self.sampling(logits))
        if self._stop_ids.numel():
            self.finished |= torch.isin(token, self._stop_ids)
        self.tokens.copy_(token)
        return self.tokens

    def _token_step(self, masked: bool) -> torch.Tensor:
        """A step that picks its token: the whole of what a graph mode captures. Compiled, an argmax
        pick is compiled with the step; a draw runs after it (inductor would swap its random stream)."""
        if self.mode not in ("compile", "compile-graph"):
            return self.pick(self._step(masked))
        if self.sampling.do_sample:
            return self.pick(self._run_compiled(masked))
        return self._run_compiled(masked, picked=True)

    def _compiled_body(self, masked: bool, picked: bool) -> torch.Tensor:
        """What ``torch.compile`` compiles: the step, and with ``picked`` its argmax pick."""
        logits = self._step(masked)
        return self.pick(logits) if picked else logits

    def step(self, tokens: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """One step on ``tokens`` (LongTensor[B]); ``valid`` (BoolTensor[B], default all) marks the
        samples whose column is real, as the last column of an eager step's ``attention_mask`` does.
        With ``sampling``, ``tokens`` may be left out: the step decodes its own last pick."""
        if tokens is not None:
            self.tokens.copy_(tokens.view(-1))
        elif self.sampling is None:
            raise ValueError("step() needs the previous tokens (a decoder without sampling= picks none itself)")
        if valid is None:
            self.valid.fill_(True)
        else:
            self.valid.copy_(valid.view(-1))
        self.steps += 1
        self._clean_steps = self._clean_steps + 1 if valid is None else 0
        masked = not self._all_visible()
        if self.mode == "eager" or (self.mode == "compile" and self.sampling is not None):
            with torch.no_grad():
                return self._token_step(masked) if self.sampling is not None else self._step(masked)
        if self.mode == "compile":
            return self._run_compiled(masked)
        if masked not in self._graphs:
            self._capture(masked)
        graph, out = self._graphs[masked]
        graph.replay()
        return out

    def _run_compiled(self, masked: bool, picked: bool = False) -> torch.Tensor:
        """The step through ``torch.compile``: one graph per form and pick (dynamo guards on the bools).

        Every decoder's ``_compiled_body`` is the same code, so dynamo's graphs and its recompile limit are
        shared by all decoders of a process. With static shapes each new batch size or prefix length
        was a new graph, and past the limit (8 by default: four shapes, two forms) the step silently
        ran eager. So shapes are left to torch: the second shape seen compiles a graph with dynamic
        sizes that serves every later one; the limit is raised (``STATIC_RECOMPILE_LIMIT``) and
        reaching it is an error, never a silent fall back to eager."""
        import torch._dynamo.config as dynamo_config
        from torch._dynamo.exc import FailOnRecompileLimitHit

        if self._compiled is None:
            self._compiled = torch.compile(self._compiled_body)
        limit = max(STATIC_RECOMPILE_LIMIT, dynamo_config.recompile_limit)
        try:
            with torch.no_grad(), dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                return self._compiled(masked, picked)
        except FailOnRecompileLimitHit as err:
            raise RuntimeError(
                f"the compiled static decode step reached its recompile limit ({limit} graphs in this process: "
                "one per model class, form and the first shapes); rather than decode uncompiled, this stops. "
                "Raise wand.static.STATIC_RECOMPILE_LIMIT, or decode with compile='eager'") from err

    def _all_visible(self) -> bool:
        """Whether the step's query sees every slot, decided on the host: every prefix slot holds a
        valid prefix key (checked once), and the last W steps were all valid (no ``valid`` given), so
        the ring holds the W most recent columns, all inside the window. Then the mask is all zeros:
        the step skips building it (about a dozen small kernels) and passes zeros made once."""
        return self._prefix_full and self._clean_steps >= self.window

    def sync_cache(self) -> WandCache:
        """Write the steps' bookkeeping back into the WandCache (its K/V buffers, slot positions and
        validity were written in place), so that the cache can be decoded further eagerly or by a new
        StaticDecoder exactly as if every step had been eager. Returns the cache."""
        cache = self.cache
        cache._next_position.copy_(self.next_position)
        cache._ring_columns_written += self.steps
        cache._columns_seen += self.steps
        self.steps = 0
        return cache

    def _capture(self, masked: bool) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), then capture one step (of the
        masked or the unmasked form; each is captured the first time it is needed).

        The warm-up step is a real step: its state changes (the random stream's included) are undone
        before capture, so the first replay is the first step. In ``"compile-graph"`` mode the warm-up
        also compiles the form, so the capture records inductor's kernels and nothing is compiled while
        capturing."""
        run = self._run_compiled if self.mode == "compile-graph" else self._step
        state = [self.next_position, self.slot, self.key_positions, self.key_valid]
        generator = None
        if self.sampling is not None:
            run = self._token_step
            state += [self.tokens, self.finished]
            if self.sampling.do_sample:
                generator = self.sampling.generator or torch.cuda.default_generators[self.device.index or 0]
        saved = [t.clone() for t in state]
        rng = generator.get_state() if generator is not None else None
        # (self.steps counts the step being captured once: the capture runs no kernel, the replay does.)
        saved_kv = [(layer.keys.clone(), layer.values.clone()) for layer in self.static_cache.layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            run(masked)
        torch.cuda.current_stream().wait_stream(stream)

        def restore():
            for target, value in zip(state, saved):
                target.copy_(value)
            for layer, (keys, values) in zip(self.static_cache.layers, saved_kv):
                layer.keys.copy_(keys)
                layer.values.copy_(values)
            if generator is not None:
                generator.set_state(rng)

        restore()
        graph = torch.cuda.CUDAGraph()
        if generator is not None and self.sampling.generator is not None:
            # A generator of one's own must be registered: each replay then draws the numbers an eager
            # step would and moves the generator on (the default one is registered by torch itself).
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph), torch.no_grad():  # records the kernels, runs none
            self._graphs[masked] = (graph, run(masked))
