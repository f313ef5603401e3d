"""How a search asked to stop tells Tune and the shell: Ctrl-C (SIGINT) and SIGTERM both set
the stop (Tune is then asked to stop through its SIGUSR1), with the shell's exit code for each
signal; the handlers are restored afterwards. A real search stopped by SIGTERM and resumed:
tests/test_tune.py."""

import os
import signal
import time

import pytest

from cifar_ray.signals import ctrl_c_stops_tune


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_sets_the_stop_with_its_exit_code(sig, code, capsys):
    before = signal.getsignal(sig)
    with ctrl_c_stops_tune() as stop:
        os.kill(os.getpid(), sig)
        deadline = time.time() + 5
        while not stop.is_set() and time.time() < deadline:
            time.sleep(0.01)
        assert stop.is_set() and stop.exit_code == code
        with pytest.raises(KeyboardInterrupt):  # a second one aborts
            os.kill(os.getpid(), sig)
            time.sleep(1)
    assert signal.getsignal(sig) is before
    assert "stopping the search" in capsys.readouterr().out
