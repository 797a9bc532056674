# Residency: where a request's data may be processed.
#   - a non-empty request.allowed_jurisdictions restricts the site's jurisdiction;
#   - params.data_class_jurisdictions restricts data classes to jurisdictions (personal -> EU);
#   - params.data_class_certifications requires site certifications (phi -> hipaa).
package infermesh.residency

import rego.v1

violation[c.id] contains msg if {
	some c in input.candidates
	count(input.request.allowed_jurisdictions) > 0
	not c.endpoint.jurisdiction in input.request.allowed_jurisdictions
	msg := sprintf("site %s is in %s, outside the allowed jurisdictions %v",
		[c.endpoint.site_id, c.endpoint.jurisdiction, input.request.allowed_jurisdictions])
}

violation[c.id] contains msg if {
	some c in input.candidates
	allowed := data.params.data_class_jurisdictions[input.request.data_class]
	not c.endpoint.jurisdiction in allowed
	msg := sprintf("%s data may only be processed in %v; site %s is in %s",
		[input.request.data_class, allowed, c.endpoint.site_id, c.endpoint.jurisdiction])
}

violation[c.id] contains msg if {
	some c in input.candidates
	some cert in data.params.data_class_certifications[input.request.data_class]
	not cert in c.endpoint.certifications
	msg := sprintf("%s data needs a %s-certified site; %s is not", [input.request.data_class, cert, c.endpoint.site_id])
}

allow contains c.id if {
	some c in input.candidates
	not violation[c.id]
}

reason[id] := concat("; ", sort(msgs)) if {
	some id, msgs in violation
}
