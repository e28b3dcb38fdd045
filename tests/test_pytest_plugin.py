"""The pytest plugin, as a user meets it: a test file of their own that uses only its fixtures."""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)
# In this process (pytester's in-process run): the plugin loads from its entry point as for a user.
QUIET = ("-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function", "-q")

USER_TESTS = '''
import pytest
from image_gen_async import TaskFailedError

{mark}
async def test_my_pipeline_makes_an_image(image_gen_session, image_gen_emulator):
    handle = await image_gen_session.dh3.submit("nano-banana-pro", prompt="a red fox")
    result = await handle
    assert result.ok and result.urls
    assert image_gen_emulator.stats.creates["dh3"] == 1

{mark}
@pytest.mark.image_gen(failure_rate=1.0, duration=0.01)
async def test_my_pipeline_reports_a_failed_task(image_gen_session, image_gen_emulator):
    with pytest.raises(TaskFailedError):
        await image_gen_session.nananobanana.generate("nano-banana", prompt="a red fox")
    assert image_gen_emulator.config.duration == 0.01

{mark}
@pytest.mark.image_gen(faults={{"poll_5xx": 0.5}}, dh3_qps=50)
async def test_my_pipeline_rides_out_faults(image_gen_session, image_gen_emulator):
    handles = [await image_gen_session.dh3.submit("nano-banana-pro", prompt=f"fox {{i}}") for i in range(5)]
    assert all([(await handle).ok for handle in handles])
    assert image_gen_emulator.stats.max_creates_in_1s["dh3"] <= 50

{mark}
async def test_a_wrong_expectation_fails(image_gen_session, image_gen_emulator):
    await (await image_gen_session.get3w.submit("google/nano-banana-pro/text-to-image", prompt="a fox"))
    assert image_gen_emulator.stats.creates["get3w"] == 2  # wrong on purpose
'''


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_a_users_tests_pass_and_fail_as_they_should(pytester: pytest.Pytester, mode: str) -> None:
    mark = "" if mode == "auto" else "@pytest.mark.asyncio"
    pytester.makepyfile(test_user=USER_TESTS.format(mark=mark))
    result = pytester.runpytest_inprocess(*QUIET, "-o", f"asyncio_mode={mode}")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_a_wrong_expectation_fails*"])


def test_the_marker_is_registered_and_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
import pytest

@pytest.mark.image_gen(no_such_setting=1)
async def test_bad(image_gen_emulator):
    pass
"""
    )
    result = pytester.runpytest_inprocess(*QUIET, "-o", "asyncio_mode=auto", "--strict-markers")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown setting 'no_such_setting'*"])
