-- Orthanc auto-routing to dicomnode: every CT or MR series goes to the DICOM modality
-- "dicomnode" (DicomModalities in orthanc.json) once it is stable, i.e. StableAge seconds
-- after its last instance arrived.
--
-- Load it with "LuaScripts": ["/path/to/orthanc-autoroute.lua"] in Orthanc's configuration
-- (in docker/compose.yaml: uncomment ORTHANC__LUA_SCRIPTS).
--
-- Series, not studies, on purpose: the SEG and RTSTRUCT that dicomnode stores back into the
-- study are new series of other modalities, so they are not sent again, and neither is the
-- CT. An OnStableStudy script would fire again when the results arrive and send the whole
-- study a second time.

local TARGET = 'dicomnode'                    -- the modality's name in DicomModalities
local MODALITIES = { CT = true, MR = true }    -- what the node's rules can use

function OnStableSeries(seriesId, tags, metadata)
   if not MODALITIES[tags['Modality'] or ''] then
      return
   end
   -- leave out copies that Orthanc itself made by /modify or /anonymize
   if metadata['ModifiedFrom'] ~= nil or metadata['AnonymizedFrom'] ~= nil then
      return
   end
   -- an asynchronous job: the Lua engine is not blocked while the series is sent, and a
   -- failed transfer can be retried from Orthanc's job list
   local job = ParseJson(RestApiPost('/modalities/' .. TARGET .. '/store',
      DumpJson({ Resources = { seriesId }, Asynchronous = true }, true)))
   print('auto-routing: ' .. tags['Modality'] .. ' series ' .. seriesId .. ' to ' .. TARGET ..
         ', job ' .. tostring(job['ID']))
end
