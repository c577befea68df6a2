#!/usr/bin/env python3
"""Groups a `perf record` of the agent by what the code does (database, crypto, SSH, runtime,
allocator, kernel) and prints a markdown table. Usage: perf-summary.py PERF_DATA"""
import re,collections,subprocess,sys
data=sys.argv[1]
out=subprocess.run(["perf","report","-i",data,"--no-children","--sort","comm,dso,symbol","--stdio","-g","none","--percent-limit","0"],capture_output=True,text=True).stdout
rules=[("database: SQLite engine",r"sqlite3"),("database: sqlx (binds, rows, channel to the SQLite thread)",r"sqlx|flume"),
("crypto: key exchange, host key, cipher (x25519, ed25519, ChaCha20-Poly1305, SHA-2)",r"curve25519|ed25519|ring_core|chacha|poly1305|sha2|sha256|Sha256|Sha512|aes|x25519|signature|digest|subtle"),
("SSH protocol (russh)",r"russh"),("inventory: JSON parse and checks",r"serde_json|serde|inventory"),
("allocator (malloc/free)",r"malloc|free|_int_|unlink_chunk|realloc|calloc|consolidate|cfree|tcache"),
("memcpy/memcmp/UTF-8",r"memmove|memcpy|memcmp|memset|strlen|from_utf8"),
("async runtime (tokio), locks",r"tokio|pthread|futex|parking|Notify|poll_fn|mio|epoll|__rust_begin_short_backtrace|Semaphore|semaphore"),
("gRPC/HTTP2 (tonic, h2, hyper)",r"tonic|h2::|hyper|prost"),("logging (tracing)",r"tracing|fmt::|Formatter|core::fmt"),
("scheduler and store (fleetsync)",r"fleetsync"),("collections (BTreeMap, Vec, String)",r"btree|BTree|alloc::|hashbrown|HashMap")]
b=collections.Counter(); total=0
for line in out.splitlines():
    m=re.match(r"\s+([0-9.]+)%\s+(\S+)\s+(\S+)\s+\[(.)\]\s+(.*)",line)
    if not m: continue
    pct=float(m.group(1)); comm=m.group(2); dso=m.group(3); kind=m.group(4); sym=m.group(5).strip(); total+=pct
    where="SQLite thread" if comm.startswith("sqlx") else "runtime threads"
    if kind=='k':
        cat="kernel: "+("context switches, futex wake/wait" if re.search(r"schedule|task_switch|futex|wake|spin_unlock|irq|try_to_wake",sym) else "sockets, files, other syscalls")
    else:
        for name,pat in rules:
            if re.search(pat,sym): cat=name; break
        else: cat="other ("+dso+")"
    b[(cat,where)]+=pct
agg=collections.Counter()
for (c,w),v in b.items(): agg[c]+=v
print("| where the agent's CPU goes | share | of which on the SQLite thread |")
print("|---|---|---|")
for c,v in agg.most_common():
    print(f"| {c} | {v:.1f}% | {b[(c,'SQLite thread')]:.1f}% |")
