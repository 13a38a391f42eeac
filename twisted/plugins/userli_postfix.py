"""twistd plugin: ``twistd -n userli-postfix`` runs the daemon."""

from twisted.application.service import ServiceMaker

service_maker = ServiceMaker(
    "userli-postfix",
    "userli_postfix.tap",
    "Postfix socketmap, policy and SASL server backed by the Userli API",
    "userli-postfix",
)
