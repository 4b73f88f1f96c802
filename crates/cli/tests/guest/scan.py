# Counts where the string on stdin appears in the guest: process environments and command
# lines, `ps auxe`, and files under the directories given. The needle comes on stdin so that no
# command line of this scan carries it.
import os
import stat
import subprocess
import sys

needle = sys.stdin.read().strip().encode()
found = {"proc": 0, "ps": 0, "files": 0}
for pid in filter(str.isdigit, os.listdir("/proc")):
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                found["proc"] += needle in f.read()
        except OSError:
            pass
found["ps"] = subprocess.run(["ps", "auxe"], capture_output=True).stdout.count(needle)
for root in sys.argv[1:]:
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
                    continue
                with open(path, "rb") as f:
                    found["files"] += needle in f.read()
            except OSError:
                pass
print(found["proc"], found["ps"], found["files"])
