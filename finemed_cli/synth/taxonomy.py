"""The department taxonomy of the FineMed reference code (Qwen_med_cls/): six departments, each split into
sub-departments, so that the paper's curriculum filters (all medicine → Internal Medicine → Endocrinology)
select the same kind of data here. The names are the reference's, so records compare with FineMed-SFT's
folders; the descriptions are written for finemed. A text is classified in two steps, department, then
sub-department, and the second step may answer `NONE` (none of the sub-departments fits)."""

from __future__ import annotations

NONE = "None"  # the second step's answer when no sub-department fits; stored as subdepartment null
INTERNAL_MEDICINE = "Internal Medicine"
OTHER = "Other Departments"  # the first step's catch-all

# department -> (what it covers, {sub-department: what it covers})
DEPARTMENTS: dict[str, tuple[str, dict[str, str]]] = {
    INTERNAL_MEDICINE: ("medical (non-operative) care of the internal organs: heart, lungs, digestive tract, "
                        "kidneys, blood, hormones and metabolism (e.g. diabetes), the nervous system", {
        "Respiratory and Critical Care Medicine": "lungs and airways (asthma, pneumonia, COPD) and intensive care "
                                                  "of the critically ill",
        "Cardiology": "heart and blood vessels (hypertension, coronary disease, arrhythmia, heart failure)",
        "Endocrinology": "hormones and metabolism (diabetes, thyroid, adrenal and pituitary disorders, obesity)",
        "Gastroenterology": "digestive tract, liver and pancreas (peptic ulcer, hepatitis, inflammatory bowel "
                            "disease)",
        "Hematology": "blood and blood-forming organs (anaemia, bleeding disorders, leukaemia, lymphoma)",
        "Nephrology": "kidneys (glomerulonephritis, acute and chronic kidney failure, dialysis)",
        "Rheumatology and Immunology": "joints, connective tissue and the immune system (rheumatoid arthritis, "
                                       "lupus, vasculitis)",
        "Neurology": "brain, spinal cord and nerves treated without operation (stroke, epilepsy, Parkinson's "
                     "disease, migraine)",
    }),
    "Surgery": ("conditions treated by operation: fractures, hernias, removal of tumours, injuries", {
        "Gastrointestinal Surgery": "operations on the stomach and bowel (gastric cancer, bowel obstruction, "
                                    "appendicitis)",
        "Hepatobiliary Surgery": "liver, gallbladder, bile ducts and pancreas (gallstones, liver tumours, "
                                 "pancreatic cancer)",
        "Urology": "kidneys, bladder, prostate and male genitals treated surgically (stones, bladder tumours, "
                   "prostate enlargement)",
        "Cardiovascular Surgery": "heart and great vessels (valve replacement, bypass grafting, aortic aneurysm)",
        "Thoracic Surgery": "lungs, oesophagus and chest wall (lung cancer, oesophageal cancer)",
        "Orthopedic Surgery": "bones, joints and spine (fractures, joint replacement, disc herniation)",
        "Neurosurgery": "operations on the brain, spine and nerves (brain tumours, intracranial bleeding, spinal "
                        "stenosis)",
        "Burns and Plastic Surgery": "burns, scars, reconstruction and cosmetic operations",
        "Thyroid Surgery": "operations on the thyroid and parathyroid glands (nodules, goitre, thyroid cancer)",
        "Breast Surgery": "breast disease (lumps, mastitis, breast cancer)",
    }),
    "Obstetrics and Gynecology": ("the female reproductive system, pregnancy and childbirth", {
        "Gynecology": "female reproductive organs outside pregnancy (menstrual disorders, infertility, uterine "
                      "and ovarian disease)",
        "Obstetrics": "pregnancy, labour and delivery, and care after birth",
    }),
    "Pediatrics": ("health and illness of infants, children and adolescents", {
        "Pediatric Internal Medicine": "medical illness in children (infections, asthma, feeding, growth and "
                                       "hormone problems)",
        "Pediatric Surgery": "operations in children (congenital malformations, hernias, injuries)",
    }),
    "Otorhinolaryngology (ENT)": ("the ear, nose and throat, and also the eyes, mouth and teeth", {
        "Otorhinolaryngology (ENT)": "ear, nose and throat (hearing loss, sinusitis, tonsillitis)",
        "Ophthalmology": "the eye and vision (cataract, glaucoma, red or painful eye)",
        "Dentistry (Oral Medicine)": "teeth, gums and mouth (caries, periodontitis, mouth ulcers)",
    }),
    OTHER: ("anything the departments above do not cover", {
        "Dermatology and Venereology": "skin disease and sexually transmitted infections",
        "Rehabilitation Medicine": "regaining function after illness, injury or operation; sports injuries",
        "Anesthesiology": "anaesthesia and pain control around operations",
        "Traditional Chinese Medicine (TCM)": "diagnosis and treatment by TCM: herbs, acupuncture, tui na",
    }),
}


def subdepartments(department: str) -> dict[str, str]:
    return DEPARTMENTS[department][1]
