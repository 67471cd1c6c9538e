{{/*
Names. KubeRay names the RayCluster and its Services after the RayService, so the name stays within 47 characters.
*/}}
{{- define "quantserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "quantserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "quantserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "quantserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quantserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the chart's objects. Pod templates get only the stable selector labels (see quantserve.podLabels). */}}
{{- define "quantserve.labels" -}}
helm.sh/chart: {{ include "quantserve.chart" . }}
{{ include "quantserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quantserve
{{- end }}

{{/*
Pod labels: nothing that changes with the chart version or the release revision, because any change of
rayClusterConfig makes KubeRay roll out a new Ray cluster. KubeRay adds ray.io/node-type, ray.io/group, ray.io/cluster.
*/}}
{{- define "quantserve.podLabels" -}}
{{ include "quantserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .root.Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "quantserve.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* Serve's HTTP port and Ray's metrics port, from the serve config. */}}
{{- define "quantserve.servePort" -}}
{{- $http := .Values.serve.http | default dict }}{{ $http.port | default 8000 }}
{{- end }}
{{- define "quantserve.metricsPort" -}}
{{- $metrics := .Values.serve.metrics | default dict }}{{ $metrics.port | default 8080 }}
{{- end }}

{{/*
serveConfigV2: the shape of `quantserve serve CONFIG --print-ray-config` (serve/app.py ray_serve_config). The serve
config less experiment/http/metrics is the application's args; the experiment is the Ingress's user_config (the A/B
router runs inside it), so an upgrade that changes only the experiment is a lightweight in-place reconfiguration.
*/}}
{{- define "quantserve.serveConfig" -}}
{{- $serve := .Values.serve }}
{{- $http := $serve.http | default dict }}
{{- $args := omit $serve "experiment" "http" "metrics" }}
proxy_location: EveryNode
http_options:
  host: {{ $http.host | default "0.0.0.0" | quote }}
  port: {{ include "quantserve.servePort" . }}
applications:
- name: {{ $serve.app_name | default "quantserve" | quote }}
  route_prefix: {{ .Values.routePrefix | quote }}
  import_path: quantserve.serve.app:build_app
  args:
    {{- toYaml $args | nindent 4 }}
  deployments:
  - name: Ingress
    user_config:
      {{- toYaml ($serve.experiment | default dict) | nindent 6 }}
{{- end }}

{{/* rayStartParams: values are strings in the CRD; the metrics port always follows serve.metrics.port. */}}
{{- define "quantserve.rayStartParams" -}}
{{- $params := .params | default dict }}
{{- if hasKey $params "metrics-export-port" }}
{{- fail (printf "%s.rayStartParams.metrics-export-port: set serve.metrics.port instead (the PodMonitors and container ports follow it)" .where) }}
{{- end }}
{{- $all := merge (dict "metrics-export-port" (include "quantserve.metricsPort" .root)) (deepCopy $params) }}
{{- range $key := keys $all | sortAlpha }}
{{ $key }}: {{ get $all $key | toString | quote }}
{{- end }}
{{- end }}

{{/* Volumes of a Ray pod: /dev/shm, the autotune cache, the model weights (when mounted on this role). */}}
{{- define "quantserve.mountsModel" -}}
{{- if and (ne .root.Values.model.source "none") (or (eq .role "worker") .root.Values.model.mountOnHead) }}true{{ end }}
{{- end }}

{{- define "quantserve.volumes" -}}
{{- $v := .root.Values }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.shm.sizeLimit | quote }}
- name: autotune-cache
{{- if eq $v.cache.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $v.cache.pvc.claimName | quote }}
{{- else if eq $v.cache.source "hostPath" }}
  hostPath:
    path: {{ $v.cache.hostPath.path | quote }}
    type: {{ $v.cache.hostPath.type | quote }}
{{- else }}
  emptyDir:
    {{- with $v.cache.emptyDir.sizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- end }}
{{- end }}
{{- if include "quantserve.mountsModel" . }}
- name: model
{{- if eq $v.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName | quote }}
    readOnly: {{ $v.model.pvc.readOnly }}
{{- else if eq $v.model.source "hostPath" }}
  hostPath:
    path: {{ $v.model.hostPath.path | quote }}
    type: {{ $v.model.hostPath.type | quote }}
{{- else }}
  emptyDir:
    {{- with $v.model.emptyDir.sizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "quantserve.volumeMounts" -}}
{{- $v := .root.Values }}
- name: shm
  mountPath: /dev/shm
- name: autotune-cache
  mountPath: {{ $v.cache.mountPath }}
{{- if include "quantserve.mountsModel" . }}
- name: model
  mountPath: {{ $v.model.mountPath }}
  {{- if eq $v.model.source "pvc" }}
  readOnly: {{ $v.model.pvc.readOnly }}
  {{- with $v.model.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
  {{- else if ne $v.model.source "initContainer" }}
  readOnly: true
  {{- end }}
{{- end }}
{{- end }}

{{/*
The pod spec of a Ray node. Arguments: root (the chart context), role (head | worker), group (head or a worker
group's values), container (the container name).
*/}}
{{- define "quantserve.podSpec" -}}
{{- $v := .root.Values }}
{{- $g := .group }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if le (int $v.shutdown.terminationGracePeriodSeconds) (int $v.shutdown.preStopSleepSeconds) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must be above shutdown.preStopSleepSeconds (%d): the pod is killed at the grace period" (int $v.shutdown.terminationGracePeriodSeconds) (int $v.shutdown.preStopSleepSeconds)) }}
{{- end }}
terminationGracePeriodSeconds: {{ $v.shutdown.terminationGracePeriodSeconds }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if and (include "quantserve.mountsModel" .) (eq $v.model.source "initContainer") }}
{{- $init := $v.model.initContainer }}
initContainers:
- name: fetch-model
  image: {{ $init.image }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with $init.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $init.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
  - name: QUANTSERVE_MODEL_DIR
    value: {{ $v.model.mountPath | quote }}
  {{- with $init.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with $init.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
  - name: model
    mountPath: {{ $v.model.mountPath }}
{{- end }}
containers:
- name: {{ .container }}
  image: {{ include "quantserve.image" .root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  ports:
  {{- if eq .role "head" }}
  - {name: gcs-server, containerPort: 6379}
  - {name: dashboard, containerPort: 8265}
  - {name: client, containerPort: 10001}
  {{- end }}
  - {name: serve, containerPort: {{ include "quantserve.servePort" .root }}}
  - {name: metrics, containerPort: {{ include "quantserve.metricsPort" .root }}}
  env:
  - name: QUANTSERVE_CACHE_DIR
    value: {{ $v.cache.mountPath | quote }}
  {{- /* Serve's proxy installs quantserve's header timeout and bounds (serve/proxy_guard.py), with the serve
         config's limits; the figures left out take the config's defaults */}}
  - name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
    value: quantserve.serve.proxy_guard:install
  - name: QUANTSERVE_PROXY_LIMITS
    value: {{ pick ($v.serve.limits | default dict) "header_timeout_s" "max_header_bytes" "max_headers" | toJson | quote }}
  {{- /* replicas and handles sample autoscaling metrics every look_back_period_s x 0.05 and push them every
         second (serve/proxy_guard.py AUTOSCALING_ENV; Ray 2.60 reads the push interval from the serve config's
         autoscaling.metrics_interval_s, later Rays from these); an entry of env below overrides it */}}
  - name: RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S
    value: "1"
  - name: RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S
    value: "1"
  - name: RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR
    value: "0.05"
  {{- with $v.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with $g.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- $resources := deepCopy ($g.resources | default dict) }}
  {{- if gt (int ($g.gpus | default 0)) 0 }}
  {{- $limits := merge (dict "nvidia.com/gpu" (int $g.gpus)) ($resources.limits | default dict) }}
  {{- $_ := set $resources "limits" $limits }}
  {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if gt (int $v.shutdown.preStopSleepSeconds) 0 }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ $v.shutdown.preStopSleepSeconds }}"]
  {{- end }}
  volumeMounts:
    {{- include "quantserve.volumeMounts" . | trim | nindent 2 }}
volumes:
  {{- include "quantserve.volumes" . | trim | nindent 0 }}
{{- end }}

{{/* One workerGroupSpecs entry. Arguments: root, group. */}}
{{- define "quantserve.workerGroup" -}}
{{- $g := .group }}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if not (kindIs "invalid" $g.idleTimeoutSeconds) }}
  idleTimeoutSeconds: {{ $g.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    {{- include "quantserve.rayStartParams" (dict "root" .root "params" $g.rayStartParams "where" (printf "worker group %s" $g.groupName)) | trim | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "quantserve.podLabels" (dict "root" .root "component" "ray-worker") | nindent 8 }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "quantserve.podSpec" (dict "root" .root "role" "worker" "group" $g "container" "ray-worker") | trim | nindent 6 }}
{{- end }}

{{/* The worker groups, as JSON: gpuWorkers (when enabled), then extraWorkerGroups with defaults for the keys they omit. */}}
{{- define "quantserve.workerGroupList" -}}
{{- $groups := list }}
{{- if .Values.gpuWorkers.enabled }}
{{- $groups = append $groups .Values.gpuWorkers }}
{{- end }}
{{- range .Values.extraWorkerGroups }}
{{- $groups = append $groups (merge (deepCopy .) (dict "gpus" 0 "replicas" 1 "minReplicas" 0 "maxReplicas" 1 "rayStartParams" dict "env" list "podAnnotations" dict)) }}
{{- end }}
{{- toJson $groups }}
{{- end }}

{{/*
Checks that values.schema.json cannot express; each message names the field, the value and what is accepted.
*/}}
{{- define "quantserve.validate" -}}
{{- $v := .Values }}
{{- $names := list }}
{{- range $v.serve.variants }}{{ $names = append $names .name }}{{ end }}
{{- $experiment := $v.serve.experiment | default dict }}
{{- range $name, $_ := ($experiment.weights | default dict) }}
{{- if not (has $name $names) }}
{{- fail (printf "serve.experiment.weights: unknown variant %q; variants: %s" $name (join ", " $names)) }}
{{- end }}
{{- end }}
{{- $shadow := $experiment.shadow | default dict }}
{{- if and $shadow.variant (not (has $shadow.variant $names)) }}
{{- fail (printf "serve.experiment.shadow.variant: unknown variant %q; variants: %s" $shadow.variant (join ", " $names)) }}
{{- end }}
{{- $http := $v.serve.http | default dict }}
{{- if has ($http.host | default "0.0.0.0") (list "127.0.0.1" "localhost" "::1") }}
{{- fail (printf "serve.http.host: %q listens on the pod's loopback only and no Service could reach it; use 0.0.0.0" $http.host) }}
{{- end }}
{{- $groups := include "quantserve.workerGroupList" . | fromJsonArray }}
{{- if not $groups }}
{{- fail "gpuWorkers.enabled is false and extraWorkerGroups is empty: the head runs with num-cpus 0, so no worker group means nowhere to run the variants' replicas" }}
{{- end }}
{{- $seen := list }}
{{- $gpuGroups := 0 }}
{{- range $groups }}
{{- if has .groupName $seen }}
{{- fail (printf "worker groups: groupName %q is used twice; each group needs its own name" .groupName) }}
{{- end }}
{{- $seen = append $seen .groupName }}
{{- if or (gt (int .minReplicas) (int .replicas)) (gt (int .replicas) (int .maxReplicas)) }}
{{- fail (printf "worker group %s: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" .groupName .minReplicas .replicas .maxReplicas) }}
{{- end }}
{{- if gt (int (.gpus | default 0)) 0 }}{{ $gpuGroups = add1 $gpuGroups }}{{ end }}
{{- end }}
{{- range $v.serve.variants }}
{{- $res := .resources | default dict }}
{{- if and (gt (float64 ($res.num_gpus | default 0)) 0.0) (eq $gpuGroups 0) }}
{{- fail (printf "serve.variants[%s].resources.num_gpus: %v GPUs per replica, but no worker group has gpus > 0 (gpuWorkers.enabled: %v)" .name $res.num_gpus $v.gpuWorkers.enabled) }}
{{- end }}
{{- end }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) }}
{{- fail "model.pvc.claimName: required when model.source is pvc" }}
{{- end }}
{{- if and (eq $v.model.source "hostPath") (not $v.model.hostPath.path) }}
{{- fail "model.hostPath.path: required when model.source is hostPath" }}
{{- end }}
{{- if and (eq $v.model.source "initContainer") (not $v.model.initContainer.image) }}
{{- fail "model.initContainer.image: required when model.source is initContainer" }}
{{- end }}
{{- if and (eq $v.cache.source "pvc") (not $v.cache.pvc.claimName) }}
{{- fail "cache.pvc.claimName: required when cache.source is pvc" }}
{{- end }}
{{- end }}
