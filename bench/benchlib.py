"""What the bench scripts share: running a tool and taking the JSON result it prints last."""
import json, os, subprocess


def last_json(out):
    """The last line of `out` that is a JSON object."""
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON result in:\n" + out[-2000:])


def run(cmd, extra_env=None):
    """Runs `cmd` (with `extra_env` added to the environment) and returns its JSON result."""
    env = dict(os.environ, **(extra_env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return last_json(p.stdout)
