import os

os.environ.setdefault("TVM_BIND_THREADS", "0")
