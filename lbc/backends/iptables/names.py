"""Names of lbc's iptables chains, and how per-service chain names are made."""

PREFIX = "LBC-"
SERVICES = "LBC-SERVICES"
NODEPORTS = "LBC-NODEPORTS"
POSTROUTING = "LBC-POSTROUTING"
MARK_MASQ = "LBC-MARK-MASQ"
FORWARD = "LBC-FORWARD"
CLUSTER_IPS = "LBC-CLUSTER-IPS"  # filter: refuse what reaches a cluster IP undiverted
FIREWALL = "LBC-FIREWALL"  # filter: keep loopback addresses off the network (route_localnet)

SVC = "LBC-SVC-"  # the cluster-wide pool of a service port
SVL = "LBC-SVL-"  # its local-endpoints pool (traffic policy Local)
SEP = "LBC-SEP-"  # one endpoint
EXT = "LBC-EXT-"  # external traffic of a service port (masquerade, policy)
FW = "LBC-FW-"  # load-balancer source ranges
DSP = "LBC-DSP-"  # a dispatch chain: the frontend rules under one key prefix (dispatch.py)

PORTALS_COMMENT = "lbc service portals"
MAX_CHAIN = 28  # the kernel's limit (XT_EXTENSION_MAXNAMELEN - 1 = 28 usable)
