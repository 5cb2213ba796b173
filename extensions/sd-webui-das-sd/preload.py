"""Command-line flags of the das-sd extension (read from shared.cmd_opts)."""


def preload(parser):
    parser.add_argument("--das-store", type=str, default=None,
                        help="das-sd feature store folder used by the DAS attribution script")
    parser.add_argument("--das-device", type=str, default=None, help="device for das-sd (default: cuda if available)")
