"""The host tier's two cost decisions, from measured device times: restore a host hit or recompute it
(`restore_pays`), and how many pages of background copies a step may carry (`step_budget`).

Fed once a step's times are read (engine/llm_engine.py, from engine/host_tier.py's StepTimer; the
simulator scripts/simulate_kv_tiers.py feeds its timing model through the same calls):

- `observe_forward(seconds, prefill_tokens)`: a step's forward on the compute stream, from the end
  of its waits for copies to its end, so a step held up by copies does not look slower;
- `observe_copies(...)`: a step's copies on the copy stream, its restores apart.

The rules:

- **Restore or recompute.** A host hit is restored while restoring a page (its restore time alone)
  is faster than prefilling its `block_size` tokens at the marginal prefill cost: the slope of a
  least-squares line through (prefill tokens, forward seconds) of the prefill steps of at least
  MIN_LINE_TOKENS tokens (or a quarter of the step token budget, if smaller), so the fixed cost of a
  small step does not count as a per-token cost. Small steps are left out of the line altogether:
  on W6 at 1.7B (H200, session 9), with restoring groups prefilled in their own steps of 64-256
  tokens, the line through all steps fell to 0.1 us a token (1.6 us a page) in round 2 (round 1's
  steps all had 16,384 tokens: the small ones alone set the slope), turned restores off and
  recomputed 1.4 M more prompt tokens. This is the serial break-even: a restore
  that overlaps the forward costs less still, so where it says restore, restoring is right; near the
  tie it may recompute when an overlapped restore would have paid. Until MIN_RESTORE_PAGES pages of
  restores have been timed, restores go ahead: on W6 at 1.7B (H200, session 9) the first restores,
  timed beside other copies (two copy streams then), turned restores off for part of round 2
  (2 flips; 1.4 M more prompt tokens recomputed, 16.4 s against 12.0 for that round), and a rule
  that says "recompute" times no more restores to correct itself until the prefill line moves.
- **Budget.** A step may carry as many pages of background copies as its expected forward lasts
  (prefill: the line at its token count; decode: the mean decode forward) over the mean copy time a
  page, 8 to 4,096 pages (128 until measured).

Why (session 6, one H200, W6 with a 64 GB host tier; claude_docs/memory.md has the table): the rule
before compared all copies' time a page (write-backs included) with the wall time of all prefill
steps over their tokens, and it had two stable states. Under lpm the only copies were write-backs
(78.6 us a page on the copy-stream clock) against prefill at 3.47 us a token (55.6 us a page):
restores were turned off after 36 pages and never timed again, and the run recomputed 2.28 M prompt
tokens with 74.6 GB written to host for nothing. Under fcfs the restoring requests' own small
prefill steps, which waited for copies, made prefill look 28.5 us a token (456 us a page); the same
wall times sized each step's copy budget, so the waits for copies kept up the budget that caused them.
The budget and the rule are CPU-tested (tests/test_copy_costs.py); not yet run on a GPU.

On the CPU reference path (`measured=False`: the "GPU" cache and the host pool are both host memory,
so the times say nothing about a GPU and jitter with the machine's load) every host hit is restored
and the budget stays at its unmeasured value: CPU runs and tests decide the same way every time.
"""

BUDGET_MIN, BUDGET_MAX, BUDGET_UNMEASURED = 8, 4096, 128
MIN_RESTORE_PAGES = 256   # restores timed before the rule may say "recompute" (one 4,096-token prefix)
MIN_LINE_TOKENS = 1024    # prefill steps smaller than this do not enter the line (their time is launch overhead)


class CopyCosts:

    def __init__(self, block_size: int, measured: bool = True, min_line_tokens: int = MIN_LINE_TOKENS):
        """min_line_tokens: the smallest prefill step in the line (the engine: MIN_LINE_TOKENS or a quarter
        of its token budget, whichever is smaller)."""
        self.block_size = block_size
        self.min_line_tokens = min_line_tokens
        self.measured = measured     # False: the CPU path, decisions do not follow its timings
        # Prefill steps: count, sum of tokens, of seconds, of tokens^2, of tokens x seconds (the line's sums).
        self.n = self.st = self.ss = self.stt = self.sts = 0.0
        self.decode_s = 0.0
        self.decode_steps = 0
        self.copy_s = 0.0
        self.copy_pages = 0
        self.restore_s = 0.0
        self.restore_pages = 0
        self.stall_s = 0.0   # the forwards' waits for copies (device time): the copies on the critical path

    def observe_forward(self, seconds: float, prefill_tokens: int = 0):
        """One step's forward time; `prefill_tokens` 0 for a decode step."""
        if prefill_tokens >= self.min_line_tokens:
            t = float(prefill_tokens)
            self.n += 1
            self.st += t
            self.ss += seconds
            self.stt += t * t
            self.sts += t * seconds
        elif not prefill_tokens:
            self.decode_s += seconds
            self.decode_steps += 1

    def observe_copies(self, seconds: float, pages: int, restore_seconds: float = 0.0, restore_pages: int = 0,
                       stall_seconds: float = 0.0):
        self.copy_s += seconds
        self.copy_pages += pages
        self.restore_s += restore_seconds
        self.restore_pages += restore_pages
        self.stall_s += stall_seconds

    def prefill_line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds a token) of a prefill step's forward, or None before one is timed.
        Falls back to a line through 0 when the steps' sizes do not spread enough to fit one (or the
        fit comes out with a negative part)."""
        if not self.n or not self.st:
            return None
        spread = self.n * self.stt - self.st * self.st
        if spread > 1e-9 * self.n * self.stt:
            slope = (self.n * self.sts - self.st * self.ss) / spread
            fixed = (self.ss - slope * self.st) / self.n
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, self.sts / self.stt

    @property
    def restore_s_per_page(self) -> float | None:
        return self.restore_s / self.restore_pages if self.restore_pages else None

    @property
    def prefill_s_per_page(self) -> float | None:
        line = self.prefill_line()
        return line[1] * self.block_size if line else None

    def restore_pays(self) -> bool:
        if not self.measured:
            return True
        restore, prefill = self.restore_s_per_page, self.prefill_s_per_page
        return self.restore_pages < MIN_RESTORE_PAGES or prefill is None or restore < prefill

    def step_budget(self, is_prefill: bool, tokens: int) -> int:
        """Pages of background copies this step may carry: as many as its forward lasts."""
        if not self.measured or not self.copy_pages or not self.copy_s:
            return BUDGET_UNMEASURED
        if is_prefill:
            line = self.prefill_line()
            if line is None:
                return BUDGET_UNMEASURED
            forward = line[0] + line[1] * tokens
        elif self.decode_steps:
            forward = self.decode_s / self.decode_steps
        else:
            return BUDGET_UNMEASURED
        return round(min(max(forward / (self.copy_s / self.copy_pages), BUDGET_MIN), BUDGET_MAX))

    def summary(self) -> dict:
        """What the decisions saw (bench.py's result, /debug/kv)."""
        restore, prefill = self.restore_s_per_page, self.prefill_s_per_page
        return {"restore_us_per_page": None if restore is None else round(restore * 1e6, 1),
                "prefill_us_per_page": None if prefill is None else round(prefill * 1e6, 1),
                "copy_us_per_page": round(self.copy_s / self.copy_pages * 1e6, 1) if self.copy_pages else None,
                "copy_stall_s": round(self.stall_s, 3), "restore_pays": self.restore_pays()}
