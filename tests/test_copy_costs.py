"""engine/copy_costs.py: the swap-or-recompute rule and the copy budget, on hand-computed times (the
session-6 H200 W6 figures where they matter)."""
import pytest

from nanovllm.engine.copy_costs import BUDGET_MAX, BUDGET_MIN, BUDGET_UNMEASURED, CopyCosts


def prefill_steps(costs, fixed_s, per_token_s, sizes):
    for tokens in sizes:
        costs.observe_forward(fixed_s + per_token_s * tokens, tokens)


def test_write_backs_alone_never_turn_restores_off():
    """lpm on the H200: only write-backs were timed (78.6 us a page) against prefill at 3.47 us a
    token (55.6 us a page); the old rule turned restores off for good. Restores are judged on their own time."""
    costs = CopyCosts(16)
    prefill_steps(costs, 0.0, 3.47e-6, [16384] * 10)
    for _ in range(100):
        costs.observe_copies(seconds=78.6e-6 * 256, pages=256)
    assert costs.restore_s_per_page is None and costs.restore_pays()
    costs.observe_copies(seconds=78.6e-6 * 10 + 47.7e-6 * 40, pages=50, restore_seconds=47.7e-6 * 40, restore_pages=40)
    assert costs.restore_s_per_page == pytest.approx(47.7e-6)
    assert costs.prefill_s_per_page == pytest.approx(16 * 3.47e-6)
    assert costs.restore_pays()   # 47.7 < 55.5 us


def test_restores_slower_than_the_marginal_prefill_are_refused():
    costs = CopyCosts(16)
    prefill_steps(costs, 2e-3, 3e-6, [64, 512, 4096, 16384])   # 48 us a page at the margin
    costs.observe_copies(0.0050, 100, restore_seconds=0.0050, restore_pages=100)   # 50 us a page
    assert costs.restore_pays()   # too few restores timed to refuse them (MIN_RESTORE_PAGES)
    costs.observe_copies(0.0100, 200, restore_seconds=0.0100, restore_pages=200)   # 50 us a page, 300 pages
    assert not costs.restore_pays()
    costs.observe_copies(0.0060, 300, restore_seconds=0.0060, restore_pages=300)   # now 32 us a page
    assert costs.restore_pays()


def test_small_prefill_steps_fixed_cost_is_not_a_per_token_cost():
    """fcfs on the H200: restoring requests' small prefill steps made prefill look 28.5 us a token
    over all steps. The line through (tokens, seconds) separates their fixed cost."""
    costs = CopyCosts(16)
    sizes = [64] * 900 + [16384] * 20 + [4096] * 5
    prefill_steps(costs, 5e-3, 3e-6, sizes)
    fixed, per_token = costs.prefill_line()
    assert fixed == pytest.approx(5e-3) and per_token == pytest.approx(3e-6)
    mean = sum(5e-3 + 3e-6 * t for t in sizes) / sum(sizes)
    assert mean > 4 * per_token   # what the old rule called the cost of a token (14.9 us here)


def test_prefill_steps_of_one_size_give_a_line_through_zero():
    costs = CopyCosts(16)
    prefill_steps(costs, 0.0, 4e-6, [2000] * 5)
    assert costs.prefill_line() == pytest.approx((0.0, 4e-6))
    assert CopyCosts(16).prefill_line() is None


def test_budget_is_the_forward_over_a_page_copy_and_ignores_stalls():
    """The budget reads forward times that exclude the waits for copies: a step whose copies made
    the forward wait does not raise the next steps' budgets."""
    costs = CopyCosts(16)
    assert costs.step_budget(False, 0) == BUDGET_UNMEASURED
    costs.observe_forward(8e-3)                       # a decode step's forward
    prefill_steps(costs, 1e-3, 3e-6, [2_000, 10_000])
    costs.observe_copies(40e-6 * 100, 100)            # 40 us a page
    assert costs.step_budget(False, 0) == 200         # 8 ms / 40 us
    assert costs.step_budget(True, 3000) == 250       # (1 ms + 9 ms) / 40 us
    costs.observe_copies(40e-6 * 100, 100, stall_seconds=5.0)
    assert costs.step_budget(False, 0) == 200 and costs.stall_s == 5.0
    assert costs.step_budget(True, 10) == 26          # (1 ms + 30 us) / 40 us, rounded
    costs.observe_forward(1000.0)
    assert costs.step_budget(False, 0) == BUDGET_MAX
    short = CopyCosts(16)
    short.observe_forward(1e-6)
    short.observe_copies(40e-6, 1)
    assert short.step_budget(False, 0) == BUDGET_MIN


def test_summary_says_what_the_rule_saw():
    costs = CopyCosts(16)
    prefill_steps(costs, 0.0, 3e-6, [1024, 2048])
    costs.observe_copies(0.012, 300, restore_seconds=0.0140, restore_pages=280, stall_seconds=0.25)
    assert costs.summary() == {"restore_us_per_page": 50.0, "prefill_us_per_page": 48.0, "copy_us_per_page": 40.0,
                               "copy_stall_s": 0.25, "restore_pays": False}


def test_cpu_path_decides_the_same_whatever_its_timings():
    """measured=False (the engine on CPU): restores always, the unmeasured budget, however the
    observed times would have decided (here: restores 10x slower than prefill)."""
    from nanovllm.engine.copy_costs import BUDGET_UNMEASURED
    for measured, pays in ((True, False), (False, True)):
        costs = CopyCosts(16, measured=measured)
        costs.observe_forward(0.002, 2000)
        costs.observe_forward(0.004, 4000)
        costs.observe_copies(0.1, 300, restore_seconds=0.1, restore_pages=300)
        assert costs.restore_pays() is pays
        assert (costs.step_budget(True, 1000) == BUDGET_UNMEASURED) is (not measured)


def test_small_prefill_steps_stay_out_of_the_line():
    """W6 at 1.7B on the H200: round 1's prefill steps all had 16,384 tokens; round 2's restoring groups
    ran in steps of 64-256 tokens whose forwards, bound by kernel launches, took far longer than the
    line says. Through all steps the slope fell to 0.1 us a token and restores were turned off; steps
    under MIN_LINE_TOKENS stay out of the line."""
    from nanovllm.engine.copy_costs import MIN_LINE_TOKENS
    costs = CopyCosts(16)
    prefill_steps(costs, 0.0, 5.1e-6, [16384] * 250)
    for tokens in (64, 128, 256) * 20:
        costs.observe_forward(0.08, tokens)   # launch-bound: ~80 ms whatever the size
    assert costs.prefill_line() == pytest.approx((0.0, 5.1e-6)) and costs.n == 250
    costs.observe_copies(37e-6 * 1000, 1000, restore_seconds=37e-6 * 1000, restore_pages=1000)
    assert costs.restore_pays()   # 37 us a page against 81.6
    everything = CopyCosts(16, min_line_tokens=1)   # the same steps all in the line: restores refused
    prefill_steps(everything, 0.0, 5.1e-6, [16384] * 250)
    for tokens in (64, 128, 256) * 20:
        everything.observe_forward(0.08, tokens)
    everything.observe_copies(37e-6 * 1000, 1000, restore_seconds=37e-6 * 1000, restore_pages=1000)
    assert everything.prefill_s_per_page < 5e-6 and not everything.restore_pays()
    assert MIN_LINE_TOKENS > 256
