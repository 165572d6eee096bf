"""Ctrl-C is calm: in --chat it stops the answer being written and returns to the prompt, at the
prompt it ends the chat, and nowhere does it print a traceback."""

import os
import signal
import subprocess
import sys
import threading
import time

from test_checkpoint import ENV, ROOT, init_dir  # noqa: F401  (init_dir: a fixture)


class Child:
    """A program whose stdout is collected as it comes, to wait for what it prints."""

    def __init__(self, args):
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0)
        self.out = ""
        threading.Thread(target=self.collect, daemon=True).start()

    def collect(self):
        while chunk := self.proc.stdout.read(1):
            self.out += chunk

    def wait_for(self, text, count=1, timeout=60):
        t0 = time.time()
        while self.out.count(text) < count:
            assert time.time() - t0 < timeout and self.proc.poll() is None, (text, self.out[-500:])
            time.sleep(0.02)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def test_ctrl_c_in_chat_stops_the_answer_and_at_the_prompt_ends_the_chat(init_dir):  # noqa: F811
    chat = Child(["tests/endless_chat.py", "--checkpoint", str(init_dir), "--chat"])
    chat.wait_for("you> ")
    chat.send("Tell me a story")
    chat.wait_for("lima> ")
    time.sleep(0.3)  # some of the endless answer is written
    chat.proc.send_signal(signal.SIGINT)
    chat.wait_for("(stopped by Ctrl-C)")
    chat.wait_for("you> ", count=2)  # back at the prompt, the program alive
    chat.send("And another")
    chat.wait_for("lima> ", count=2)
    time.sleep(0.1)
    chat.proc.send_signal(signal.SIGINT)
    chat.wait_for("you> ", count=3)
    chat.proc.send_signal(signal.SIGINT)  # at the prompt: the end
    assert chat.proc.wait(timeout=30) == 0
    err = chat.proc.stderr.read()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert chat.out.endswith("you> \n")  # the shell's prompt starts on a line of its own


def test_ctrl_c_while_answering_a_file_says_what_was_saved(init_dir, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    run = Child(["tests/endless_chat.py", "--checkpoint", str(init_dir), "--prompts", str(prompts),
                 "--out", str(tmp_path / "answers.jsonl")])
    time.sleep(3)  # loading, then the endless first answer
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=30) == 130
    err = run.proc.stderr.read()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"stopped by Ctrl-C. {tmp_path / 'answers.jsonl'}: holds every answer "
                                            f"finished so far; the same command answers the rest")
