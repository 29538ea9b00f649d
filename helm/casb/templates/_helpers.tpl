{{- define "casb.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "casb.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "casb.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* casb.yaml: the user's config plus the paths and listeners the chart owns. */}}
{{- define "casb.config" -}}
{{- $tls := dict "cert_file" "/etc/casb/tls/tls.crt" "key_file" "/etc/casb/tls/tls.key" -}}
{{- $auditUser := .Values.config.audit | default dict -}}
{{- $checkpoints := merge (dict "signing_key_file" "/etc/casb/audit-signing/signing-key.pem") ($auditUser.checkpoints | default dict) -}}
{{- $audit := merge (dict "path" "/var/log/casb/audit.jsonl" "checkpoints" $checkpoints) (omit $auditUser "checkpoints") -}}
{{- $owned := dict
  "state_dir" "/var/lib/casb"
  "listeners" (list (dict "mode" "reverse" "host" "0.0.0.0" "port" .Values.service.proxyPort "tls" $tls))
  "policy" (dict "paths" (list "/etc/casb/policies"))
  "audit" $audit -}}
{{- if .Values.redisSecret -}}
{{- $_ := set $owned "state" (merge (dict "password_file" "/etc/casb/redis/password") (.Values.config.state | default dict)) -}}
{{- else if .Values.config.state -}}
{{- $_ := set $owned "state" .Values.config.state -}}
{{- end -}}
{{- if .Values.telemetrySecret -}}
{{- $_ := set $owned "telemetry" (dict "pseudonym_key_file" "/etc/casb/telemetry/pseudonym-key") -}}
{{- end -}}
{{- $admin := merge (dict "host" "0.0.0.0" "port" .Values.service.adminPort) (.Values.config.admin | default dict) -}}
{{- $cfg := merge (dict "admin" $admin) $owned (omit .Values.config "admin" "audit" "telemetry" "state") -}}
{{- toYaml $cfg -}}
{{- end -}}
