# Residency: where a request's data may be processed.
#   - a non-empty request.allowed_jurisdictions restricts the site's jurisdiction;
#   - params.data_class_jurisdictions restricts data classes to jurisdictions (personal -> EU);
#   - params.data_class_certifications requires site certifications (phi -> hipaa).
package infermesh.residency

import rego.v1

# The reasons endpoint ep may not process request req (empty: allowed). A function of its
# arguments only, so the bundle's tests can call it directly. Each reason is the requirement the
# site fails; the site and its jurisdiction are said once, in the rule's reason below.
site_violations(req, ep, params) := (jurisdiction_violations(req, ep) | class_violations(req, ep, params)) | certification_violations(req, ep, params)

jurisdiction_violations(req, ep) := {msg |
	count(req.allowed_jurisdictions) > 0
	not ep.jurisdiction in req.allowed_jurisdictions
	msg := sprintf("outside the allowed jurisdictions %v", [req.allowed_jurisdictions])
}

class_violations(req, ep, params) := {msg |
	allowed := params.data_class_jurisdictions[req.data_class]
	not ep.jurisdiction in allowed
	msg := sprintf("%s data may only be processed in %v", [req.data_class, allowed])
}

certification_violations(req, ep, params) := {msg |
	some cert in params.data_class_certifications[req.data_class]
	not cert in ep.certifications
	msg := sprintf("%s data needs a %s-certified site", [req.data_class, cert])
}

violation[c.id] := msgs if {
	some c in input.candidates
	msgs := site_violations(input.request, c.endpoint, data.params)
	count(msgs) > 0
}

allow contains c.id if {
	some c in input.candidates
	not violation[c.id]
}

# concat, not sprintf's %s, joins the parts: rego-cpp's sprintf re-quotes a string with quotes in it
# that concat built, and the result is no longer valid JSON for the engine to read.
reason[c.id] := concat(": ", [sprintf("site %s is in %s", [c.endpoint.site_id, c.endpoint.jurisdiction]), concat("; ", sort(msgs))]) if {
	some c in input.candidates
	msgs := violation[c.id]
}
