from twisted.application.service import ServiceMaker

foxnode_host = ServiceMaker(
    "foxnode-host",
    "foxnode.host",
    "K foxnode nodes in one process, sharing one reactor (foxnode devnet runs these).",
    "foxnode-host",
)
